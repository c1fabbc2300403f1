#!/usr/bin/env bash
# The GPU checks of issue 5, in one go, for a session that has a GPU. On an H200 (2026-11-30,
# docs/PERFORMANCE.md) part 1 took about 60 s, part 2 about 30 s, an inductor part about 190 s
# (a cold compile); CUDA graphs by inductor:reduce-overhead crashed there (a segmentation fault),
# so parts 2-3 measure the engine's own graphs (BatchRunner(cuda_graphs=True)) instead.
# Prints everything; the JSON lines are the record.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   COMPILE=0 bash benchmarks/gpu_check.sh  # without part 3 (torch.compile)
#   OUT=dir bash benchmarks/gpu_check.sh    # also write each part's output under dir
#
# On the lent GPU machine (Python 3.12, torch, no index): run benchmarks/device_wheels.sh here
# first and carry `.whl`; this script installs those wheels into /tmp/site when clip or dall_e is
# missing. The device tool's call: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"]).
#
#   DRY_RUN=1 bash benchmarks/gpu_check.sh  # every part on the CPU with tiny models: checks the
#                                           # script itself (tests/test_benchmarks.py), no figures
#
# 1. benchmarks/cuda_check.py: bf16 smoke test, no host sync in the hot loop, batched vs solo on
#    the GPU (fp32 and bf16), memory per slot against engine.capacity, a 1000-iteration 256x256
#    job alone timed (the bar: under 60 s), a real out-of-memory error halving the passes, a job
#    replayed from a CUDA graph against the same job eager (check 7), the engine's CLIP attention
#    against nn.MultiheadAttention's and a bf16 job from precast bf16 weights against autocast's
#    casts (check 8);
# 2. benchmarks/bench_loop.py on CUDA, eager: (a) the notebook loop, (b) the engine with one job,
#    with and without a CUDA graph (--cuda-graphs), (c) the engine with max_batch jobs (the bars:
#    (b) >= 2x (a), (c) >= 8x (a)); then 5 steps of (a) and of each (b) profiled: the GPU's busy
#    time per step against the step, kernels and ATen calls per step, the top kernels. (--skip-reference-fp32: (a32), the
#    notebook's loop in fp32, was 0.97x (a) on the H200; `bench_loop.py` alone still runs it.)
# 3. the same with torch.compile (inductor, the worker's default on CUDA, `[worker] compile =
#    "auto"`): (b) compiled with and without a graph, (c) compiled. Last: a slow compile that
#    runs past the call's time limit costs nothing of 1-2.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import clip, dall_e" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            || { echo "gpu_check: installing .whl/*.whl failed"; exit 1; }
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -c "import clip, dall_e" || { echo "gpu_check: clip/dall_e missing: run benchmarks/device_wheels.sh and carry .whl"; exit 1; }
fi
OUT=${OUT:-}
[ -n "$OUT" ] && mkdir -p "$OUT"
status=0

# The device call has a hard limit (600 s); every part runs under what is left of BUDGET_S, so
# that a part that runs long is stopped (exit 124) with the later parts skipped, and every log so
# far still comes back.
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
part() {  # part NAME COMMAND...: run, print, keep the output, remember a failure
    local name=$1; shift
    local left=$(( deadline - $(date +%s) ))
    [ "${CAP:-0}" -gt 0 ] && [ "$left" -gt "$CAP" ] && left=$CAP   # CAP=S part ...: at most S seconds
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped, ${left} s of BUDGET_S left"; status=1; return; fi
    echo "=== $name: $* ($(date -u +%H:%M:%S), ${left} s left)"
    if [ -n "$OUT" ]; then timeout "$left" "$@" 2>&1 | tee "$OUT/$name.log"; rc=${PIPESTATUS[0]}
    else timeout "$left" "$@" 2>&1; rc=$?; fi
    echo "=== $name: exit $rc"
    [ "$rc" -ne 0 ] && status=1
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
if [ "${DRY_RUN:-0}" = 1 ]; then
    # The same parts and flags, on the CPU with tiny models and few steps.
    # torch.compile's `eager` backend: dynamo traces, nothing is compiled (inductor would need minutes here).
    on=(--device cpu --tiny --grid 8); steps=(--iterations 2 --warmup 1)
    backend=eager
else
    on=(--device cuda --grid 32); steps=(--iterations 50 --warmup 5)
    backend=inductor
fi
part cuda_check "$PY" benchmarks/cuda_check.py "${on[@]}" --long-iterations "${LONG_ITERATIONS:-1000}"
part bench_graphs "$PY" benchmarks/bench_loop.py "${on[@]}" "${steps[@]}" --skip-reference-fp32 --cuda-graphs --profile 5
if [ "${COMPILE:-1}" = 1 ]; then
    part bench_compile_graphs "$PY" benchmarks/bench_loop.py "${on[@]}" "${steps[@]}" --skip-reference-fp32 --compile "$backend" --cuda-graphs
fi
echo "=== gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOMETHING FAILED)"
exit $status
