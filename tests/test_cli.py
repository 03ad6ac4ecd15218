"""The command line as a user meets it: --version, help for every flag, and a
mistake answered by one line (the traceback only with -v)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import zarrdali
from zarrdali.cli import build_parser, main


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"zarrdali": parser, **sub.choices}


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"zarrdali {zarrdali.__version__}"


@pytest.mark.parametrize("command", list(_commands()))
def test_every_command_and_flag_is_described(command):
    parser = _commands()[command]
    assert parser.description and len(parser.description) > 60
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help and len(action.help) > 8, (command, action.dest)
    text = parser.format_help()
    assert "::" not in text and "``" not in text  # no developer markup
    if command != "zarrdali":
        assert "-v, --verbose" in text


def test_help_shows_defaults():
    text = " ".join(_commands()["prepare"].format_help().split())
    assert "(default: 64.0)" in text  # --shard-mb
    assert "(default: zstd)" in text  # --codec


def test_a_mistake_is_one_line(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "nothere.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("zarrdali stats: error: StoreNotFoundError:")
    assert "nothere.zarr" in err and "-v for the traceback" in err


def test_verbose_shows_the_traceback(tmp_path, capsys):
    # -v after the command too, as people type it
    assert main(["stats", str(tmp_path / "nothere.zarr"), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert "zarrdali stats: error: StoreNotFoundError:" in err


def test_a_netcdf_file_is_pointed_to_prepare(tmp_path, capsys):
    path = tmp_path / "era5.nc"
    path.write_bytes(b"CDF\x01" + bytes(60))
    assert main(["stats", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"zarrdali prepare {path} era5.zarr" in err and err.count("\n") == 1


def test_bench_without_its_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # find_spec: not installed
    assert main(["bench", "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'zarrdali[bench]'" in err and "psutil" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing started


def test_python_dash_m_runs_the_same_command():
    out = subprocess.run(
        [sys.executable, "-m", "zarrdali", "--version"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == f"zarrdali {zarrdali.__version__}"
