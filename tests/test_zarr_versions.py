"""Stores written by each supported zarr-python line load bit for bit.

``tests/fixtures/zarr-<version>/store.zarr`` were written by zarr 3.1 (Python
3.11) and zarr 3.4 (Python 3.13) with ``tests/version_stores.py``; CI reads
both under each of its environments, so a store written by one line is read by
the other. The same store written here by this environment's zarr-python is
read too. Plain, sharded (index at either end, either byte order), gzip, blosc,
lz4, uncompressed + crc32c, big-endian, int16, missing chunks (NaN and other
fill values), zarr's default codecs and both chunk key encodings.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

import zarrdali
from version_stores import FIXTURES, all_specs, expected
from zarrdali.store.open import load_layouts, open_group

STORES = sorted(FIXTURES.glob("zarr-*/store.zarr"))


def test_both_zarr_lines_have_a_fixture():
    lines = {p.parent.name.split("-")[1].rsplit(".", 1)[0] for p in STORES}
    assert {"3.1", "3.4"} <= lines


@pytest.fixture(scope="module")
def here_store(tmp_path_factory) -> Path:
    """The same store, written by this environment's zarr-python."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("here")
    code = (
        "import sys, version_stores as v; v.FIXTURES = __import__('pathlib').Path(sys.argv[1]); "
        "v.main()"
    )
    tests = Path(__file__).parent
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=tests, timeout=300)
    return out / f"zarr-{zarr.__version__}" / "store.zarr"


def _check(store: Path) -> None:
    specs = all_specs()
    group, name = open_group(store)
    layouts = load_layouts(group, name, [s.name for s in specs])
    slow = [layout.name for layout in layouts if not layout.fast_path]
    assert not slow, f"read through zarr-python, not the fast path: {slow}"
    oracle = zarr.open_group(store, mode="r")
    for spec in specs:
        want = expected(spec)
        got = np.asarray(oracle[spec.name][...])  # zarr-python here agrees with the writer
        np.testing.assert_array_equal(got, want, err_msg=f"zarr-python, {spec.name}")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: zarrdali decodes it all
            loader = zarrdali.ZarrLoader(
                store,
                [spec.name],
                input_steps=1,
                tile=None,
                batch_size=spec.shape[0],
                shuffle=False,
                device="cpu",
                workers=0,
            )
        with loader:
            (batch,) = list(loader)
        assert batch["index"][:, 0].tolist() == list(range(spec.shape[0]))
        frames = batch["input"][:, 0].numpy()  # [T, C, H, W]
        want_c = want if want.ndim == 4 else want[:, None]
        # bit for bit: the stored values as float32, NaN where stored NaN
        np.testing.assert_array_equal(
            frames.view(np.uint32),
            want_c.astype(np.float32).view(np.uint32),
            err_msg=f"zarrdali, {spec.name}",
        )


@pytest.mark.parametrize("store", STORES, ids=[p.parent.name for p in STORES])
def test_store_written_by_each_zarr_line_loads_bit_for_bit(store: Path):
    versions = json.loads((store.parent / "versions.json").read_text())
    assert versions["zarr"] == store.parent.name.removeprefix("zarr-")
    _check(store)


def test_store_written_here_loads_bit_for_bit(here_store: Path):
    _check(here_store)
