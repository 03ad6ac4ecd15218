#!/usr/bin/env bash
# One short run on a GPU host (about 5-8 minutes on an H200): the GPU engine's
# device tests, then the decode benchmark for zstd (64 KB and 1 MB chunks) and
# LZ4 (64 KB, with DALI's inflate for comparison). Needs CuPy, kvikIO and
# nvidia-libnvcomp (DALI's dependency) installed; writes into $OUT (default
# ./bench-out). Run from the repository root:  bash benchmarks/verify_gpu_engine.sh
set -u -o pipefail
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:-$(pwd)/src}"
status=0
python -c "import cupy, kvikio; from nvidia import libnvcomp; print(cupy.__version__, kvikio.__version__, libnvcomp.__version__)" \
    || { echo "missing the GPU stack"; exit 2; }
timeout 330 python -m pytest -q -p no:cacheprovider -m gpu --maxfail=20 -rfE \
    tests/test_gpu_engine.py tests/test_gpu_backend.py 2>&1 | tee "$OUT/gpu_tests.txt" || status=1
timeout 150 python benchmarks/decode_gpu.py --out "$OUT/decode_gpu_zstd.json" --repeats 3 \
    2>&1 | tee "$OUT/decode_gpu_zstd.txt" || status=1
timeout 90 python benchmarks/decode_gpu.py --codec lz4 --chunks 64k --out "$OUT/decode_gpu_lz4.json" \
    --repeats 3 2>&1 | tee "$OUT/decode_gpu_lz4.txt" || status=1
exit $status
