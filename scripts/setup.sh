#!/usr/bin/env bash
# Install zarrdali and everything its tests and benchmark need on a fresh Linux
# machine. torch is installed first, pinned, so pip does not replace it with a
# newer build that pulls several GB of CUDA packages on CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,bench,remote]"
