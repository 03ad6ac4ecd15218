"""Credentials in ``storage_options`` (or in a URL) never reach what zarrdali prints
or writes: reprs, error messages, ``bench.json`` (its spec and its recorded
command line)."""

from __future__ import annotations

import json
import pickle

import pytest

import zarrdali
from zarrdali.cpu.reader import EpochReader

pytest.importorskip("obstore")
pytest.importorskip("moto")
from zarrdali.bench.objectserver import ACCESS_KEY, SECRET_KEY, S3Server, upload

BUCKET = "secrets"


def test_redacted_options_keep_settings_and_hide_the_rest():
    from zarrdali.io.remote import redact_argv, redact_options
    from zarrdali.store.open import StoreRef

    options = {
        "secret_access_key": "HIDDEN-1",
        "key": "HIDDEN-2",
        "token": "HIDDEN-3",
        "password": "HIDDEN-4",
        "custom_credential": "HIDDEN-5",
        "something_unknown": "HIDDEN-6",
        "endpoint_url": "https://user:HIDDEN-7@minio.local:9000",
        "region": "eu-west-1",
        "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "HIDDEN-8"},
    }
    shown = json.dumps(redact_options(options))
    assert "HIDDEN" not in shown, shown
    assert "eu-west-1" in shown and "minio.local:9000" in shown
    argv = ["bench", "s3://b/x.zarr", "--storage-options", json.dumps(options)]
    assert "HIDDEN" not in " ".join(redact_argv(argv))
    assert "HIDDEN" not in " ".join(redact_argv([f"--dst-storage-options={json.dumps(options)}"]))
    ref = StoreRef("https://me:hunter2@host/x.zarr", options)
    assert "hunter2" not in repr(ref) and "HIDDEN" not in repr(ref)
    assert pickle.loads(pickle.dumps(ref)).storage_options == options  # workers still get them


@pytest.mark.time_limit(240)
def test_bench_json_and_reprs_hold_no_secret(tmp_path):
    from zarrdali.cli import main
    from zarrdali.sample_data import SHARDED, SampleDataSpec, write_sample_data

    data = tmp_path / "sample"
    write_sample_data(data, SampleDataSpec(n_time=12, n_lat=37, n_lon=72), progress=False)
    with S3Server() as s3:
        upload(s3.endpoint, BUCKET, data / SHARDED, f"x/{SHARDED}")
        url = f"s3://{BUCKET}/x/{SHARDED}"
        options = {**s3.storage_options(), "secret_access_key": SECRET_KEY}
        options.pop("secret")
        loader = zarrdali.ZarrLoader(
            url, ["t2m"], tile=(16, 16), device="cpu", workers=0, storage_options=options
        )
        with loader:
            reader = EpochReader(
                loader.store_ref,
                loader.variables,
                loader.spec,
                loader.candidates,
                loader.sampler,
                0,
                0,
                backend_type=type(loader.backend),
            )
            shown = " ".join(
                [repr(loader), repr(loader.store_ref), repr(reader), str(loader.stats)]
            )
        out = tmp_path / "bench"
        args = ["bench", url, "--storage-options", json.dumps(options), "--loaders", "zarrdali-cpu"]
        args += ["--threads", "1", "--tile", "16", "16", "--batches", "2", "--epochs", "1"]
        args += ["--warmup", "1", "--batch-size", "2", "--out", str(out), "-q"]
        assert main(args) == 0
    written = (out / "bench.json").read_text() + (out / "bench.md").read_text()
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in shown, f"{secret} in a repr"
        assert secret not in written, f"{secret} written to the bench results"
    payload = json.loads((out / "bench.json").read_text())
    assert "--storage-options" in payload["command"] and "<redacted>" in payload["command"]
    assert payload["spec"]["storage_options"]["secret_access_key"] == "<redacted>"
    assert payload["results"][0]["summary"]["status"] == "ok"
