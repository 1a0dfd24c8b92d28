"""The factored layer's training step from one or two source trees, in interleaved blocks.

Each ``--src`` folder (one holding the ``spherical_losses`` package, e.g. ``src`` or an
extracted older commit) gets its own worker process; the workers take turns running blocks of
``--steps`` steps at one size, alternating which goes first, and each block reports its median
step. With two trees, the ratio of the first's block to the second's is taken per round and
summarized by its median and range: a slow-down of the shared machine during a round hits
both sides of that round. With one tree, the per-round times show how one process's step
time moves over a run.

Examples
--------
The step of the code at commit ``BASE`` against the working tree::

    mkdir -p /tmp/base && git archive BASE src | tar x -C /tmp/base
    python benchmarks/step_ab.py --src /tmp/base/src --src src --threads 1

One process's step time over 20 blocks of 200 steps::

    python benchmarks/step_ab.py --src src --rounds 20 --steps 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    """Answers each line ``N`` on stdin with the median of N steps, in milliseconds."""
    import torch
    from bench_factored import zipf_targets

    from spherical_losses import FactoredSGD, FactoredSphericalLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    num_classes, d = (int(x) for x in args.size.split(":"))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    layer = FactoredSphericalLoss(d, num_classes, args.loss)
    opt = FactoredSGD(layer, lr=args.lr)
    batches = [
        (torch.randn(args.batch, d, requires_grad=True), zipf_targets(num_classes, args.batch, gen))
        for _ in range(8)
    ]
    count = 0

    def step() -> None:
        nonlocal count
        h, target = batches[count % len(batches)]
        opt.zero_grad()
        layer(h, target).backward()
        opt.step()
        count += 1

    for _ in range(args.warmup):
        step()
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(statistics.median(times) * 1e3, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", action="append", default=[], help="source tree (1 or 2)")
    parser.add_argument("--size", default="10000:128", help="D:d (default 10000:128)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--loss", default="taylor")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="steps per block")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if len(args.src) not in (1, 2):
        parser.error(f"--src must be given once or twice, got {len(args.src)} times")
    here = Path(__file__).resolve().parent
    command = [sys.executable, __file__, "--worker"]
    for name in ("size", "batch", "loss", "lr", "warmup", "threads"):
        command += [f"--{name}", str(getattr(args, name))]
    workers = []
    for src in args.src:
        path = os.pathsep.join([str(Path(src).resolve()), str(here)])
        env = dict(os.environ, PYTHONPATH=path)
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        workers.append(subprocess.Popen(command, text=True, env=env, **pipes))
    times: list[list[float]] = [[] for _ in workers]
    for r in range(args.rounds):
        order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
        for i in order:
            workers[i].stdin.write(f"{args.steps}\n")
            workers[i].stdin.flush()
            times[i].append(float(workers[i].stdout.readline()))
        print(f"round {r + 1}: " + "  ".join(f"{t[-1]:.3f} ms" for t in times), flush=True)
    for w in workers:
        w.stdin.close()
        w.wait()
    for src, t in zip(args.src, times, strict=True):
        print(f"{src}: median step {statistics.median(t):.3f} ms")
    if len(workers) == 2:
        ratios = [a / b for a, b in zip(*times, strict=True)]
        print(
            f"first / second: median {statistics.median(ratios):.3f} over {args.rounds} rounds "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
