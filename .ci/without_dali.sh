#!/usr/bin/env bash
# CI step: zarrdali installed as a user installs it, without DALI or any GPU
# library. A fresh virtual environment on the default Python gets torch's CPU
# build, then the wheel built from this tree with the extras a CPU user names
# (netcdf for the prepare example, docs for the documentation) and pytest;
# never DALI. From a folder outside the repository it runs the CLI, the
# README's quickstart and examples as files and a test selection against the
# installed wheel, then builds the documentation with warnings as errors.
# Prints the install size. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
venv="${ZARRDALI_NODALI_VENV:-$ROOT/.ci-nodali}"
start=$SECONDS

rm -rf "$venv" "$venv.dist"
"$PY" -m venv "$venv"
vpy="$venv/bin/python"
pip=("$vpy" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install "torch==${TORCH_VERSION:-2.13.0}"
"${pip[@]}" wheel --no-deps --wheel-dir "$venv.dist" .
wheel=$(ls "$venv.dist"/zarrdali-*.whl)
"${pip[@]}" install "$wheel[netcdf,docs]" "pytest>=9.0.3" "hypothesis>=6.155.2"
echo "== without DALI: installed in $((SECONDS - start)) s ($("$vpy" --version))"
if "$vpy" -c "import nvidia.dali" 2>/dev/null; then
    echo "== without DALI: DALI is installed in $venv: this step proves nothing" >&2
    exit 1
fi
site=$("$vpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
total=$(du -sm "$site" | cut -f1)
torch_mb=$(du -smc "$site"/torch "$site"/torch-* "$site"/functorch 2>/dev/null | tail -1 | cut -f1)
echo "== without DALI: site-packages ${total} MB, of which torch ${torch_mb} MB"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"  # outside the repository: only the installed wheel can be imported
"$venv/bin/zarrdali" --version
"$venv/bin/zarrdali" sample-data sample-data -q --n-time 12 --n-lat 129 --n-lon 256
"$venv/bin/zarrdali" stats sample-data/era5_sharded.zarr -q >/dev/null
if "$venv/bin/zarrdali" bench sample-data/era5_sharded.zarr 2>bench.err; then
    echo "== without DALI: bench ran without its extra" >&2
    exit 1
fi
grep -q "pip install 'zarrdali\[bench\]'" bench.err  # names the extra, one line
cat bench.err

# the quickstart, the examples, the CLI and the CPU path, on the installed wheel
cd "$ROOT"
PYTHONPATH="" "$vpy" -m pytest -q -p no:cacheprovider \
    tests/test_examples.py tests/test_first_run.py tests/test_cli.py
"$vpy" - <<'EOF'
import zarrdali, sys
assert "site-packages" in zarrdali.__file__, zarrdali.__file__  # the wheel, not src/
assert not [m for m in sys.modules if m.startswith("nvidia")]
EOF

echo "== docs: mkdocs build --strict"
NO_MKDOCS_2_WARNING=1 "$venv/bin/mkdocs" build --strict --quiet --site-dir "$work/site"
echo "== without DALI and docs: passed in $((SECONDS - start)) s"
