"""The README's quickstart and the examples, run as a user runs them: as files,
in a fresh process (the CPU path's worker processes are spawned and import the
file again), in a folder of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from zarrdali.sample_data import SampleDataSpec, write_sample_data

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HAVE_NETCDF = any(find_spec(name) for name in ("netCDF4", "h5netcdf", "scipy"))


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def quickstart() -> tuple[list[str], str]:
    """The README's quickstart: its shell commands and its Python file."""
    section = _section(README.read_text(), "Quickstart")
    (commands,) = _blocks(section, "bash")
    (code,) = _blocks(section, "python")
    return [line.split("#")[0].strip() for line in commands.splitlines()], code


def _env() -> dict[str, str]:
    """This environment (the zarrdali the tests import: PYTHONPATH, or the installed
    one), with worker processes on, as a user runs it."""
    env = dict(os.environ)
    env.pop("ZARRDALI_WORKERS", None)
    return env


def test_readme_quickstart_runs_as_a_file(tmp_path):
    commands, code = quickstart()
    assert commands == ["zarrdali sample-data sample-data/"]
    assert 'if __name__ == "__main__":' in code
    # the sample data at a small size (the default is about 1 GB), same names and layouts
    spec = SampleDataSpec(n_time=12, n_lat=129, n_lon=256)
    write_sample_data(tmp_path / "sample-data", spec, progress=False)
    (tmp_path / "quickstart.py").write_text(code)
    result = subprocess.run(
        [sys.executable, "quickstart.py"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # 4 tiles x 7 windows = 28 samples: 4 batches of 8, the last of 4
    assert lines == [f"epoch {e}: 4 batches, last input (4, 4, 4, 128, 128)" for e in range(3)]


def test_the_documentation_shows_the_same_quickstart():
    _, code = quickstart()
    assert code in (ROOT / "docs" / "getting-started.md").read_text()


def test_readme_links_work_on_the_package_index():
    """PyPI shows the README without the repository: every link and image is absolute."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert targets and all(t.startswith("https://") for t in targets), targets
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images
    import tomllib

    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for image in images:
        assert image.startswith(raw) and (ROOT / image.removeprefix(raw)).is_file(), image
    for target in targets:
        if target.startswith(repo + "/blob/main/"):
            path = target.removeprefix(repo + "/blob/main/").split("#")[0]
            assert (ROOT / path).exists(), target


@pytest.mark.skipif(not HAVE_NETCDF, reason="needs a NetCDF library (the netcdf extra)")
def test_prepare_and_train_example_runs_as_a_file(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_and_train.py"), "--workdir", "work"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4: loss" in result.stdout
    assert (tmp_path / "work" / "radar.zarr" / "zarr.json").is_file()
