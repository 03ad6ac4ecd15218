"""``benchmarks/decode_gpu.py`` at tiny size: its CPU-only mode on this machine,
and its GPU rows on the CPU stand-in of ``fakegpu`` (the code paths of the
C API and zarrdali rows run; their numbers mean nothing there)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import fakegpu

BENCH = Path(__file__).parent.parent / "benchmarks" / "decode_gpu.py"
TINY = ["--time-steps", "7", "--batches", "1", "--batch-size", "2", "--warmup", "0",
        "--repeats", "1", "--threads", "2", "--steps", "2"]  # fmt: skip


def _bench():
    spec = importlib.util.spec_from_file_location("decode_gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    payload = json.loads(out.read_text())
    return {(r["section"], r["name"]): r for r in payload["results"]}


def test_cpu_only_mode(tmp_path, monkeypatch):
    from zarrdali import gpu

    monkeypatch.setattr(gpu, "missing_gpu_requirements", lambda: ["a CUDA GPU (none visible)"])
    out = tmp_path / "b.json"
    assert _bench().main(["--out", str(out), "--chunks", "64k", "1m", *TINY]) == 0
    rows = _rows(out)
    for section in ("zstd, 64k chunks", "zstd, 1m chunks"):
        for name in ("numcodecs", "zarrdali-cpu", "gpu-host"):
            assert rows[(section, name)]["status"] == "ok"
        for name in ("nvcomp-capi", "zarrdali-gpu[pinned]", "zarrdali-gpu[kvikio,warm-cache]"):
            assert rows[(section, name)]["status"] == "skipped"


@pytest.mark.skipif(importlib.util.find_spec("nvidia.libnvcomp") is None, reason="no libnvcomp")
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_gpu_rows_on_the_fake_device(tmp_path, monkeypatch, codec):
    from zarrdali import gpu
    from zarrdali.gpu import decode

    cuda = fakegpu.install(monkeypatch)
    monkeypatch.setattr(gpu, "missing_gpu_requirements", lambda: [])
    monkeypatch.setattr(decode, "nvcomp_capi", lambda: cuda.api)
    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", None)  # the Python API row fails: reported
    out = tmp_path / "b.json"
    assert _bench().main(["--out", str(out), "--chunks", "64k", "--codec", codec, *TINY]) == 0
    rows = _rows(out)
    section = f"{codec}, 64k chunks"
    capi = rows[(section, "nvcomp-capi")]
    assert capi["status"] == "ok" and "0 bad statuses, 0 wrong sizes" in capi["note"]
    assert rows[(section, "nvcomp-python")]["status"] == "failed"
    for read in ("kvikio", "pinned"):
        assert rows[(section, f"zarrdali-gpu[{read}]")]["status"] == "ok"
        warm = rows[(section, f"zarrdali-gpu[{read},warm-cache]")]
        assert warm["status"] == "ok", warm["note"]
        assert warm["transfers"]["file_reads"] > 0 and "0.0 MB read per pass" in warm["note"]
        assert warm["cache"]["hits"] > 0 and warm["memory"]["cache_capacity"] > 0
