"""The factored layer's training step from one or two source trees, in interleaved blocks.

Each ``--src`` folder (one holding the ``spherical_losses`` package, e.g. ``src`` or an
extracted older commit) gets its own ``bench_factored.py`` factored-layer worker, with that
folder first on its ``PYTHONPATH``; the workers take turns running blocks of ``--steps`` steps
at one size, alternating which goes first, and each block gives its median step. With two
trees, the ratio of the first's block to the second's is taken per round and summarized by its
median and range: a slow-down of the shared machine during a round hits both sides of that
round. With one tree, the per-round times show how one process's step time moves over a run.

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
import sys
from pathlib import Path

from bench_factored import WorkerProcess


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
    args = parser.parse_args()
    if len(args.src) not in (1, 2):
        parser.error(f"--src must be given once or twice, got {len(args.src)} times")
    for src in args.src:
        if not (Path(src) / "spherical_losses" / "__init__.py").is_file():
            # (else the workers would import the installed package and compare it with itself)
            parser.error(f"--src {src}: no spherical_losses package there")
    num_classes, d = (int(x) for x in args.size.split(":"))
    # What bench_factored's workers read: warm-up of at least --warmup steps, no minimum time
    # per block (each block is --steps steps), the default device.
    worker_args = argparse.Namespace(
        batch=args.batch, warmup=args.warmup, min_time=0.0, loss=args.loss, lr=args.lr,
        device="cpu", threads=args.threads,
    )  # fmt: skip
    workers: list[WorkerProcess] = []
    times: list[list[float]] = [[] for _ in args.src]
    try:
        for src in args.src:
            path = [str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
            workers.append(WorkerProcess(worker_args, "factored", num_classes, d, env=env))
        for r in range(args.rounds):
            order = range(len(workers)) if r % 2 == 0 else reversed(range(len(workers)))
            for i in order:
                block = workers[i].block(0.0, args.steps)
                if block is None:
                    sys.exit(f"the worker for {args.src[i]} failed: {workers[i].error}")
                times[i].append(statistics.median(block) * 1e3)
            print(f"round {r + 1}: " + "  ".join(f"{t[-1]:.3f} ms" for t in times), flush=True)
    finally:
        for worker in workers:
            worker.finish()
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
