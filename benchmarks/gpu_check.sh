#!/usr/bin/env bash
# The GPU checks of issue 5, in one go, for a session that has a GPU (about 5 minutes on an
# H100/H200, most of it the benchmark). Prints everything; the JSON lines are the record.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   COMPILE=1 bash benchmarks/gpu_check.sh  # also the engine with torch.compile (adds minutes)
#   OUT=dir bash benchmarks/gpu_check.sh    # also write each part's output under dir
#
# 1. benchmarks/cuda_check.py: bf16 smoke test, no host sync in the hot loop, batched vs solo on
#    the GPU (fp32 and bf16), memory per slot against engine.capacity, a 1000-iteration 256x256
#    job alone timed (the bar: under 60 s);
# 2. benchmarks/bench_loop.py on CUDA: (a) the notebook loop, (b) the engine with one job, (c)
#    the engine with max_batch jobs (the bars: (b) >= 2x (a), (c) >= 8x (a));
# 3. the engine again with dall_e's own fp16 casts off (autocast alone decides the precision):
#    what switching them off in engine.models would gain.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-}
[ -n "$OUT" ] && mkdir -p "$OUT"
status=0

part() {  # part NAME COMMAND...: run, print, keep the output, remember a failure
    local name=$1; shift
    echo "=== $name: $* ($(date -u +%H:%M:%S))"
    if [ -n "$OUT" ]; then "$@" 2>&1 | tee "$OUT/$name.log"; rc=${PIPESTATUS[0]}; else "$@" 2>&1; rc=$?; fi
    echo "=== $name: exit $rc"
    [ "$rc" -ne 0 ] && status=1
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

export PYTHONWARNINGS=ignore
part cuda_check "$PY" benchmarks/cuda_check.py --device cuda --grid 32
part bench_loop "$PY" benchmarks/bench_loop.py --device cuda --grid 32 --iterations 50 --warmup 5
part bench_no_dalle_casts "$PY" benchmarks/bench_loop.py --device cuda --grid 32 --iterations 30 --warmup 5 \
    --skip-reference --dalle-half-casts off
if [ "${COMPILE:-0}" = 1 ]; then
    part bench_compile "$PY" benchmarks/bench_loop.py --device cuda --grid 32 --iterations 50 --warmup 5 \
        --skip-reference --compile
fi
echo "=== gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOMETHING FAILED)"
exit $status
