#!/usr/bin/env bash
# The GPU verification's device calls (benchmarks/README.md, "From a session
# with the project's GPU machine"), each one short command line:
#
#   bash benchmarks/gpu_host_run.sh stage .stack/p1          # call 1 (carry .stack/p1)
#   bash benchmarks/gpu_host_run.sh stage .stack/p2          # call 2 (carry .stack/p2)
#   bash benchmarks/gpu_host_run.sh run HASH .stack/p3       # call 3 (carry .stack/p3, timeout_s 600)
#
# "stage" copies a part of the packed GPU stack to /tmp/stage; "run" stages the
# last part, unpacks the stack into /tmp/site (it checks every part's sha256 and
# names the missing ones) and runs benchmarks/gpu_verify.py with --require-gpu
# into $OUT, the device run's output folder. Extra arguments after the part go
# to gpu_verify.py (e.g. --steps imports,stack-check). STAGE, SITE and DATA
# override /tmp/stage, /tmp/site and the sample data's folder, PYTHON python3.
set -euo pipefail
python=${PYTHON:-python3}
stage=${STAGE:-/tmp/stage}
site=${SITE:-/tmp/site}
data=${DATA:-/tmp/zarrdali-verify/sample-data}
mode=${1:?usage: gpu_host_run.sh stage PART | run COMMIT PART [gpu_verify args]}
case "$mode" in
stage)
    part=${2:?the part folder, e.g. .stack/p1}
    mkdir -p "$stage" && cp "$part"/* "$stage"/
    ls -l "$stage"
    ;;
run)
    commit=${2:?the commit being verified (the device copy has no .git)}
    part=${3:?the last part folder, e.g. .stack/p3}
    shift 3
    mkdir -p "$stage" && cp "$part"/* "$stage"/
    "$python" "$part/gpu_pack.py" unpack "$stage" "$site"
    PYTHONPATH="$site:$PWD/src" exec "$python" benchmarks/gpu_verify.py \
        --out "${OUT:?the device run sets OUT}" --require-gpu --commit "$commit" \
        --stack-check "$part/gpu_stack_check.py" \
        --data-dir "$data" "$@"
    ;;
*)
    echo "unknown mode $mode: stage or run" >&2
    exit 2
    ;;
esac
