"""steps.core.storage against a real S3-protocol server (`moto_server` on 127.0.0.1)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from steps.core.storage import (MANIFEST, ChecksumMismatch, StorageError, TransferSettings, client, download_dir,
                                endpoint_url, parse_s3_uri, upload_dir)
from tests.helpers import free_port, moto_s3


MiB = 1 << 20
# Small parts so that a 6 MiB file really goes up in two parts (S3's floor is 5 MiB).
SMALL_PARTS = TransferSettings(multipart_threshold_bytes=5 * MiB, multipart_chunksize_bytes=5 * MiB,
                               max_concurrency=2)


def test_parse_uri_and_endpoint():
    assert parse_s3_uri("s3://b/a/b/") == ("b", "a/b")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(StorageError, match="expected s3://"):
        parse_s3_uri("/local/path")
    assert endpoint_url({"AWS_ENDPOINT_URL": "http://a", "S3_ENDPOINT_URL": "http://b"}) == "http://b"
    assert endpoint_url({}) is None
    with pytest.raises(ValueError, match="5 MiB"):
        TransferSettings(multipart_chunksize_bytes=MiB)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process for this module; yields a client with a bucket `bundles`."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        c = client(SMALL_PARTS)
        c.create_bucket(Bucket="bundles")
        yield c


@pytest.fixture
def bundle(tmp_path) -> Path:
    d = tmp_path / "bundle"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(6 * MiB + 123))
    (d / "config.json").write_text('{"hidden_size": 64}\n')
    (d / "sub" / "tokenizer.json").write_text("{}")
    return d


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_upload_download_roundtrip_is_byte_identical(s3, bundle, tmp_path):
    manifest = upload_dir(bundle, "s3://bundles/models/v1", SMALL_PARTS, s3)
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "sub/tokenizer.json"}
    big = s3.head_object(Bucket="bundles", Key="models/v1/model.safetensors")
    assert big["ETag"].strip('"').endswith("-2"), "the 6 MiB file should have gone up in two parts"
    assert big["Metadata"]["sha256"] == manifest["files"]["model.safetensors"]["sha256"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bundles", Prefix="models/v1/")["Contents"]}
    assert f"models/v1/{MANIFEST}" in keys

    out = tmp_path / "restored"
    download_dir("s3://bundles/models/v1", out, SMALL_PARTS, s3)
    restored = _tree(out)
    assert restored.pop(MANIFEST)
    assert restored == _tree(bundle)


@pytest.mark.slow
def test_tampered_object_is_detected_and_named(s3, bundle, tmp_path):
    upload_dir(bundle, "s3://bundles/models/v2", SMALL_PARTS, s3)
    s3.put_object(Bucket="bundles", Key="models/v2/sub/tokenizer.json", Body=b'{"evil": true}')
    out = tmp_path / "restored"
    with pytest.raises(ChecksumMismatch, match=r"sub/tokenizer\.json: checksum mismatch .*models/v2/sub/tokenizer"):
        download_dir("s3://bundles/models/v2", out, SMALL_PARTS, s3)
    assert not out.exists() and not (tmp_path / "restored.download").exists()


@pytest.mark.slow
def test_missing_manifest_and_dead_endpoint_fail_clearly(s3, bundle, tmp_path, monkeypatch):
    with pytest.raises(StorageError, match="cannot read the manifest"):
        download_dir("s3://bundles/nothing-here", tmp_path / "x", SMALL_PARTS, s3)
    # A server that is not there: botocore retries, tenacity retries, then an error naming the file.
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    quick = TransferSettings(max_attempts=2, file_attempts=2, connect_timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"upload .*bundle/(config\.json|model\.safetensors|sub/tokenizer\.json)"):
        upload_dir(bundle, "s3://bundles/models/v3", quick)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_export_uploads_the_bundle_when_s3_uri_is_set(s3, tmp_path):
    """export with `s3_uri`: the bundle lands under <uri>/<model_name>/<ref> and verifies on the way back."""
    import json

    import yaml

    from steps import export

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    row = {"correctness": 0.5, "helpfulness": 0.5, "em": 0.5, "f1": 0.6, "tokens_per_response": 80.0,
           "decode_tflops_per_response": 1e-6, "prefill_tflops_per_response": 1e-6,
           "latency_s_per_response_batched": 0.01, "latency_s_single_request": 0.02, "n": 4}
    summary = {"datasets": {"musique": {"rft_grpo": row}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    from steps.core.fingerprint import dir_digest
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"export": {"model_name": "m", "source": "rft_grpo", "register": False, "s3_uri": "s3://bundles/exports"},
         "models": {"rft_grpo": {"stage": "grpo", "path": str(model)}}}))
    (tmp_path / "evaluate" / "rft_grpo").mkdir(parents=True)
    (tmp_path / "evaluate" / "rft_grpo" / "stats.json").write_text(json.dumps({"model_digest": dir_digest(model)}))
    export.main(["--params", str(tmp_path / "params.yaml"), "--evaluations", str(tmp_path / "evaluate"),
                 "--summary", str(tmp_path / "summary.json"), "--out", str(tmp_path / "export")])
    registry = json.loads((tmp_path / "export" / "registry.json").read_text())
    assert registry["s3_uri"].startswith("s3://bundles/exports/m/")
    download_dir(registry["s3_uri"], tmp_path / "back", s3=s3)
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "back" / "checksums.json").exists()
