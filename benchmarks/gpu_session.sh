#!/bin/bash
# Everything a lent GPU machine runs in one call (its time is short), in order of need, each
# part in its own time box: the CUDA tests, then the GPU tables (the factored step, the dense
# losses, the linear path and a whole language model). Logs and tables go under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh
#
# A dry run on a machine without a GPU (Triton's interpreter runs the kernels):
#   OUT=/tmp/gpu DEV=cpu TRITON_INTERPRET=1 BUDGET=300 SMALL=1 bash benchmarks/gpu_session.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
DEV=${DEV:-cuda}
BUDGET=${BUDGET:-560}   # seconds for the whole script
PY=${PY:-python3}
SMALL=${SMALL:-}        # tiny sizes, for the dry run
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
log=$OUT/log.txt
exec > >(tee -a "$log") 2>&1

# box SECONDS COMMAND...: runs COMMAND for at most SECONDS (less if the budget has less left,
# keeping 10 s for the end), and says how it ended.
box() {
    local t=$1 l
    shift
    l=$(($(left) - 10))
    ((t > l)) && t=$l
    if ((t < 5)); then
        echo "(skipped: the time box is spent)"
        return
    fi
    timeout "$t" "$@"
    local rc=$?
    ((rc == 124)) && echo "(stopped at its ${t} s time box)" || echo "(exit $rc)"
}
part() { echo; echo "== $1 ($(left) s left, $(date +%T))"; }

if [[ -n $SMALL ]]; then
    FACTORED_SIZES=1000:16
    LOSSES_SIZES="256x10 64x3000"
    LINEAR_ARGS="--sizes 64:1000:16"
    LM_ARGS="--sizes 256:2000:32"
else
    FACTORED_SIZES=100000:128,100000:512,793471:128,793471:512  # the sizes of the bars
    LOSSES_SIZES="4096x10 4096x1000 2048x10000 256x100000"  # the CPU table's
    LINEAR_ARGS=""  # the issue's grid: m, D, d in {1024, 4096, 16384} x {1e4, 1e5, 793471} x ...
    LM_ARGS=""      # 4,096 tokens per step, D = 100,000 and 793,471, d = 512
fi

part "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name())"
$PY -c "import triton; print('triton', triton.__version__)"
git log --oneline -1 2>/dev/null

part "CUDA tests"
box 150 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_factored_graph.py \
    2>&1 | tail -25
box 70 $PY -m pytest -q -p no:cacheprovider tests/test_factored.py tests/test_pt2.py \
    tests/test_linear.py -k cuda 2>&1 | tail -15

part "factored step (m = 128), eager and captured in a CUDA graph"
box 150 $PY benchmarks/bench_factored.py --device "$DEV" --sizes "$FACTORED_SIZES" \
    --methods dense,factored,factored_graph,dense_graph --rounds 3 --min-time 0.4 \
    --out "$OUT/factored_gpu.md" 2>&1 | grep -v "^$"

part "dense losses, forward + backward, float32 and bfloat16"
# shellcheck disable=SC2086
box 110 $PY benchmarks/bench_losses.py --device "$DEV" --sizes $LOSSES_SIZES \
    --dtype float32,bfloat16 --kernels both --budget 0.03 --out "$OUT/losses_gpu.md" \
    2>&1 | grep -v "^$"

part "linear path without logits"
# shellcheck disable=SC2086
box 100 $PY benchmarks/bench_linear.py --device "$DEV" $LINEAR_ARGS --repeats 2 \
    --out "$OUT/linear_gpu.md" 2>&1 | grep -v "^$"

part "a whole language model, AdamW"
# shellcheck disable=SC2086
box 70 $PY benchmarks/bench_linear.py --device "$DEV" --lm $LM_ARGS --repeats 3 \
    --out "$OUT/lm_gpu.md" 2>&1 | grep -v "^$"

part "end"
