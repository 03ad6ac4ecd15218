"""What a new user runs into first: arguments given the way people type them,
paths with ``~``, a NetCDF file instead of a store, and an environment without
DALI (the CPU path needs none; ``device="cuda"`` says what to install)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import zarrdali
from storefactory import VarSpec
from zarrdali import ConfigError, StoreNotFoundError, ZarrLoader

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(make_store) -> Path:
    return make_store(VarSpec("a", shape=(10, 32, 32), chunks=(1, 16, 16)), VarSpec("b"))


def _loader(store, **kw) -> ZarrLoader:
    kw.setdefault("variables", ["a"])
    return ZarrLoader(store, device="cpu", workers=0, batch_size=4, **kw)


def test_an_int_tile_is_a_square(store):
    with _loader(store, tile=16) as square, _loader(store, tile=(16, 16)) as pair:
        assert square.spec.tile == pair.spec.tile == (16, 16)
        assert len(square) == len(pair)
        np.testing.assert_array_equal(next(iter(square))["input"], next(iter(pair))["input"])
    with _loader(store, tile=(16, 16), tile_stride=8) as strided:
        assert strided.spec.tile_stride == (8, 8)


@pytest.mark.parametrize("tile", ["128", (16,), (16, 16, 16), (16.5, 16), (0, 16), True, -4])
def test_a_tile_that_is_no_tile_is_a_config_error(store, tile):
    with pytest.raises(ConfigError, match=r"tile must be \(height, width\)"):
        _loader(store, tile=tile)


@pytest.mark.parametrize(
    "variables, message",
    [
        ({"a": (0.0, 1.0)}, "not a mapping"),
        ({"a"}, "not a set"),
        ([], "is empty"),
        ([1, 2], "each variable is an array name"),
    ],
)
def test_variables_must_be_names_in_order(store, variables, message):
    with pytest.raises(ConfigError, match=message):
        _loader(store, variables=variables)


def test_a_tilde_path_is_the_home_directory(store, monkeypatch):
    monkeypatch.setenv("HOME", str(store.parent))
    with _loader(f"~/{store.name}", tile=16) as loader:
        assert loader.store_name == str(store)
        assert loader.store_ref.store == str(store)  # what worker processes reopen
        assert next(iter(loader))["input"].shape == (4, 1, 1, 16, 16)


@pytest.mark.parametrize("suffix", [".nc", ".grib2"])
def test_a_netcdf_or_grib_file_gets_a_hint_to_convert_it(tmp_path, suffix):
    path = tmp_path / f"era5{suffix}"
    path.write_bytes(b"CDF\x01" + bytes(60))
    with pytest.raises(StoreNotFoundError, match=r"is a file, not a Zarr store") as err:
        _loader(path)
    assert f"zarrdali prepare {path} era5.zarr" in str(err.value)
    with pytest.raises(StoreNotFoundError, match="zarrdali prepare"):
        _loader(tmp_path / "missing.nc")  # a typo in the name: the hint too


def test_every_constructor_argument_is_documented():
    """The API reference lists every argument (Google style ``Args:``); an argument
    added without its line fails here."""
    doc = inspect.getdoc(ZarrLoader)
    args = doc.split("\nArgs:\n", 1)[1].split("\n\n", 1)[0]
    documented = re.findall(r"^    (\w+): \S", args, flags=re.M)
    params = list(inspect.signature(ZarrLoader.__init__).parameters)[1:]
    assert documented == params  # all of them, in the signature's order
    for name in ("set_epoch", "state_dict", "load_state_dict", "close", "epoch_plan"):
        method_doc = inspect.getdoc(getattr(ZarrLoader, name))
        assert method_doc and len(method_doc) > 60, name
    assert "Args:\n    epoch:" in inspect.getdoc(ZarrLoader.set_epoch)
    assert "Args:\n    state:" in inspect.getdoc(ZarrLoader.load_state_dict)
    assert "Returns:\n" in inspect.getdoc(ZarrLoader.state_dict)


# An environment without DALI: a package named `nvidia` first on the path that
# refuses every import below it (spawned workers inherit PYTHONPATH, so they too).
_NO_DALI = 'raise ModuleNotFoundError("nvidia.* is blocked: this test runs without DALI")\n'


def _run_without_dali(tmp_path: Path, code: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    (blocker / "nvidia").mkdir(parents=True)
    (blocker / "nvidia" / "__init__.py").write_text(_NO_DALI)
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(code))
    # the zarrdali the tests import (PYTHONPATH, or the installed one), DALI blocked
    paths = [str(blocker), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths).rstrip(os.pathsep))
    env.pop("ZARRDALI_WORKERS", None)
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_cpu_path_runs_without_dali(store, tmp_path):
    """``import zarrdali``, a CPU loader with worker processes, ``device="auto"``,
    and ``device="cuda"`` naming DALI and the extra that brings it."""
    result = _run_without_dali(
        tmp_path,
        f"""
        import sys
        import zarrdali

        if __name__ == "__main__":
            try:
                import nvidia.dali  # noqa: F401
                raise SystemExit("DALI is importable: the test proves nothing")
            except ImportError:
                pass
            store = {str(store)!r}
            with zarrdali.ZarrLoader(store, ["a"], input_steps=2, tile=16, batch_size=4,
                                     shuffle=True, device="cpu", workers=2) as loader:
                n = sum(1 for _ in loader)
                assert n == len(loader) > 0, n
            with zarrdali.ZarrLoader(store, ["a"], tile=16, device="auto") as loader:
                assert loader.device == "cpu" and next(iter(loader))["input"].shape[-1] == 16
            try:
                zarrdali.ZarrLoader(store, ["a"], tile=16, device="cuda")
            except zarrdali.BackendUnavailableError as err:
                print("CUDA:", err)
            assert not any(m == "nvidia.dali" or m.startswith("nvidia.dali.") for m in sys.modules)
            print("served", n, "batches")
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "served" in result.stdout
    cuda = result.stdout.split("CUDA:", 1)[1]
    assert "DALI" in cuda and "pip install 'zarrdali[cuda13]'" in cuda


def test_the_gpu_requirements_name_dali(monkeypatch):
    from zarrdali.gpu import backend

    monkeypatch.setattr(backend, "_has_module", lambda name: not name.startswith("nvidia.dali"))
    assert backend.missing_gpu_requirements()[0] == "DALI (module 'nvidia.dali')"


def test_the_version_is_the_one_pyproject_declares():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert zarrdali.__version__ == declared
