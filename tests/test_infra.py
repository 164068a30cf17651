"""infra/local_services.sh: start moto, MLflow and Prefect on loopback, log an artefact through
the MLflow server and find it in the S3 bucket, then stop everything."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "local_services.sh"

PROBE = """
import os, boto3
from steps.core import tracking
open("probe.txt", "w").write("probe")
tracking.log_stage("probe", {"k": 1}, metrics={"m": 1.0}, artifacts=["probe.txt"])
s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
keys = [o["Key"] for o in s3.list_objects_v2(Bucket=os.environ["S3_BUCKET"]).get("Contents", [])]
assert any(k.endswith("/artifacts/probe.txt") for k in keys), keys
import httpx
assert httpx.get(os.environ["PREFECT_API_URL"] + "/health").status_code == 200
print("probe ok")
"""


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        out[key] = value
    return out


@pytest.mark.slow
def test_local_services_start_serve_and_stop(tmp_path):
    env = {**os.environ, "S3_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PREFECT_PORT": str(free_port()), "VENV_BIN": str(Path(sys.executable).parent)}
    d = tmp_path / "services"
    pids: list[int] = []
    try:
        start = subprocess.run([str(SCRIPT), "start", str(d)], env=env, capture_output=True, text=True, timeout=240)
        assert start.returncode == 0, start.stdout + start.stderr
        services = _env_file(d / "services.env")
        assert services["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{env['MLFLOW_PORT']}"
        pids = [int((d / f"{n}.pid").read_text()) for n in ("moto", "mlflow", "prefect")]
        probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, **services, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert probe.returncode == 0 and "probe ok" in probe.stdout, probe.stdout + probe.stderr[-3000:]
    finally:
        stop = subprocess.run([str(SCRIPT), "stop", str(d)], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (d / "services.env").exists()
