"""`dvc push` to an S3 remote, then `git clone` + `dvc pull` elsewhere, restores every output of
the pipeline byte for byte. The micro preset runs locally (no Docker needed); the remote is a
moto S3 server on loopback, reached the way a real one is (`endpointurl`, AWS credentials)."""
from __future__ import annotations

import boto3
import pytest

from tests.helpers import add_s3_remote, clone_and_pull, dvc_outputs, moto_s3, run

pytestmark = pytest.mark.slow


def test_dvc_pull_into_a_fresh_clone_restores_every_output_byte_identical(micro_run, tmp_path):
    ws, env = micro_run  # a finished run (tests/conftest.py), shared with the serving tests
    env = {**env, "PIPELINE_TRACKING": "off"}  # the registry is not what this test is about
    with moto_s3(tmp_path) as s3_env:
        env.update(s3_env)
        s3 = boto3.client("s3", endpoint_url=s3_env["S3_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="dvc")
        add_s3_remote(ws, env, "s3://dvc/livethinking", s3_env["S3_ENDPOINT_URL"])
        run(ws, env, "dvc", "push")
        stored = s3.list_objects_v2(Bucket="dvc", Prefix="livethinking/").get("KeyCount", 0)
        before, after = clone_and_pull(ws, tmp_path / "clone", env)

    original = dvc_outputs(ws)
    assert None not in original.values()
    # What git does not carry (the cached outputs: data, models) came from the S3 remote...
    from_remote = {path for path, digest in before.items() if digest is None}
    assert {"data/ingest/train.jsonl", "data/grpo/model", "data/export/bundle"} <= from_remote
    assert stored >= len(from_remote)
    # ...and every output, from git or from the remote, is the original's byte for byte.
    assert after == original
