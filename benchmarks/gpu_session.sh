#!/bin/bash
# Everything a lent GPU machine runs in one call (its time is short): the CUDA tests, the
# factored layer's collectives on NCCL, the GPU benchmark table, and what fits of the paper
# profile's MNIST comparison. Writes its logs and results under $OUT.
#
#   OUT=/some/dir DATA=/path/to/data bash benchmarks/gpu_session.sh
#
# DATA holds mnist/ (and ptb/) as in ../shared/data. DEV=cpu and the *_ARGS variables make a
# small dry run possible on a machine without a GPU.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
DEV=${DEV:-cuda}
DATA=${DATA:-.gpudata}
BUDGET=${BUDGET:-520}                  # seconds for the whole script
BENCH_ARGS=${BENCH_ARGS:---rounds 3 --min-time 0.6}
MNIST_ARGS=${MNIST_ARGS:-}
PY=${PY:-python3}
start=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - start))); }
log=$OUT/log.txt
exec > >(tee -a "$log") 2>&1

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"

echo "== CUDA tests ($(left) s left)"
timeout 100 $PY -m pytest -q -p no:cacheprovider tests/test_factored.py -k cuda 2>&1 | tail -15

echo "== FactoredSGD over NCCL, one process ($(left) s left)"
timeout 60 $PY - "$DEV" <<'PY'
import sys, torch, torch.distributed as dist
import spherical_losses as sl
dev = sys.argv[1]
dist.init_process_group("nccl" if dev == "cuda" else "gloo", init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
torch.manual_seed(0)
a = sl.FactoredSphericalLoss(32, 1000, "taylor").to(dev)
b = sl.FactoredSphericalLoss(32, 1000, "taylor").to(dev)
b.load_state_dict(a.state_dict())
oa = sl.FactoredSGD(a, lr=0.5, process_group=dist.group.WORLD)
ob = sl.FactoredSGD(b, lr=0.5)
for step in range(30):
    h = torch.randn(64, 32, device=dev)
    t = torch.randint(0, 1000, (64,), device=dev)
    for o, layer in ((oa, a), (ob, b)):
        o.zero_grad(); layer(h, t).backward(); o.step()
diff = ((a.weight - b.weight).norm() / b.weight.norm()).item()
print(f"backend {dist.get_backend()}: 30 steps, relative weight difference {diff:.2e}, "
      f"last exchange {oa.last_exchange_bytes} bytes")
dist.destroy_process_group()
PY

echo "== factored benchmark ($(left) s left)"
timeout 220 $PY benchmarks/bench_factored.py --device "$DEV" --methods dense,factored,linear_ce,adaptive \
    $BENCH_ARGS --out "$OUT/factored_gpu.md" 2>&1 | grep -v "^|" | grep -v "^$"

echo "== MNIST, paper profile ($(left) s left)"
runs=/tmp/gpu-runs
mkdir -p $runs
jobs=""
for seed in 0 1 2; do for loss in log_softmax taylor spherical z_loss softmax_bound mse; do
    jobs="$jobs $loss:$seed"
done; done
stop=$(( $(left) - 25 ))
echo $jobs | tr ' ' '\n' | timeout $stop xargs -P 6 -I{} bash -c '
    loss=${1%:*}; seed=${1#*:}
    '"$PY"' -m spherical_losses train --task mnist --profile paper --loss $loss --seed $seed \
        --device '"$DEV"' --data-dir '"$DATA"' --out '"$runs"' --quiet '"$MNIST_ARGS"' \
        > '"$runs"'/$loss-$seed.log 2>&1 && echo "done $loss seed $seed ($(date +%T))"
' _ {}
echo "stopped at $(date +%T); finished runs:"; ls $runs/mnist/*/*/final.json 2>/dev/null | wc -l
$PY -m spherical_losses report $runs/mnist > /dev/null 2>&1
tar czf "$OUT/mnist-paper.tgz" -C $runs --exclude='*.pt' --exclude='*.png' mnist $(cd $runs && ls *.log) 2>/dev/null
echo "== end ($(left) s left)"
