"""The oldest versions pyproject.toml claims are the ones CI's default leg pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    installed = ("test", "bench", "remote", "netcdf")  # what CI installs, at the pins
    requirements = [*project["dependencies"], *(req for e in installed for req in extras[e])]
    bounds = {}
    for req in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", req)
        assert match, f"{req!r} declares no lower bound"
        bounds[match.group(1).lower()] = match.group(3)
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_lower_bound_is_pinned_for_the_oldest_leg():
    assert _pins() == _lower_bounds()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_cpu_install_needs_no_dali_and_the_gpu_extras_bring_it():
    project = _project()
    assert not [req for req in project["dependencies"] if "dali" in req.lower()]
    extras = project["optional-dependencies"]
    for extra in ("cuda12", "cuda13"):
        assert any(req.startswith("nvidia-dali-cuda1") for req in extras[extra]), extra
    assert any(req.lower().startswith("netcdf4") for req in extras["netcdf"])
    assert {"mkdocs", "mkdocstrings[python]"} <= {
        re.split(r"[<>=; ]", req, maxsplit=1)[0] for req in extras["docs"]
    }


def test_license_and_metadata_for_the_package_index():
    project = _project()
    assert project["license"] == "Apache-2.0"  # an SPDX expression (PEP 639), not a table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    # a license classifier beside a license expression is an error since PEP 639
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    assert "Typing :: Typed" in project["classifiers"]
    versions = {c.rsplit(":: ", 1)[1] for c in project["classifiers"] if ":: Python :: 3." in c}
    assert versions == {"3.11", "3.12", "3.13"}
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert "setuptools>=77" in build["requires"]  # the first with PEP 639
    assert (ROOT / "src" / "zarrdali" / "py.typed").is_file()


_BUILD = """
import sys, tarfile, zipfile
from setuptools import build_meta
out = sys.argv[1]
sdist = build_meta.build_sdist(out)
wheel = build_meta.build_wheel(out)
with tarfile.open(f"{out}/{sdist}") as tar:
    print("\\n".join("S " + n.split("/", 1)[1] for n in tar.getnames() if "/" in n))
with zipfile.ZipFile(f"{out}/{wheel}") as whl:
    print("\\n".join("W " + n for n in whl.namelist()))
"""


def test_wheel_and_sdist_contents(tmp_path):
    """The wheel carries py.typed and the license; the sdist carries the whole
    test suite (conftest, helpers, fixtures) and what its tests run, so
    ``pytest`` works in the unpacked sdist."""
    import subprocess
    import sys

    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates PEP 639 (pip builds with >= 77)")
    result = subprocess.run(
        [sys.executable, "-c", _BUILD, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    wheel = {line[2:] for line in result.stdout.splitlines() if line.startswith("W ")}
    sdist = {line[2:] for line in result.stdout.splitlines() if line.startswith("S ")}
    assert "zarrdali/py.typed" in wheel
    assert "zarrdali-0.1.0.dist-info/licenses/LICENSE" in wheel
    assert not [n for n in wheel if n.startswith(("tests/", "docs/"))]
    tracked = [
        p.relative_to(ROOT).as_posix()
        for folder in ("tests", "examples")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    ]
    missing = [name for name in tracked if name not in sdist]
    assert not missing, missing[:10]
    for needed in ("LICENSE", ".ci/oldest-constraints.txt", "benchmarks/gpu_verify.py"):
        assert needed in sdist
    assert not [n for n in sdist if n.startswith("benchmarks/results/")]
