"""How often a process aborts at exit after a two-process gloo run, with and without the wait.

With torch 2.13's gloo backend a process can abort at interpreter exit (SIGABRT, "terminate
called without an active exception") after its work is done; the command line's
``_close_process_group`` waits briefly after ``destroy_process_group`` to prevent it. This
script runs ``--pairs`` pairs of processes, each training a factored layer for 25 steps over a
gloo group (as ``tests/test_factored_distributed.py`` does) and then ending either with
``destroy_process_group()`` alone (``plain``) or with ``_close_process_group()`` (``wait``),
and counts the processes that abort (SIGABRT) and those that fail otherwise. Rerun it on a
new torch version to see whether the wait is still needed.

Example::

    python benchmarks/gloo_exit_check.py --pairs 40
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS, CLASSES, FEATURES = 25, 40, 6


def child(rank: int, init_file: str, mode: str) -> None:
    import torch
    import torch.distributed as dist

    from spherical_losses import FactoredSGD, FactoredSphericalLoss
    from spherical_losses.experiments.cli import _close_process_group

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    layer = FactoredSphericalLoss(FEATURES, CLASSES, "spherical", dtype=torch.float64)
    opt = FactoredSGD(layer, lr=0.3, weight_decay=0.01, process_group=dist.group.WORLD)
    gen = torch.Generator().manual_seed(1)
    rows = slice(0, 5) if rank == 0 else slice(5, None)
    for _ in range(STEPS):
        h = torch.randn(13, FEATURES, generator=gen, dtype=torch.float64)
        target = torch.randint(0, CLASSES // 4, (13,), generator=gen)
        opt.zero_grad()
        layer(h[rows], target[rows]).backward()
        opt.step()
    if mode == "wait":
        _close_process_group()
    else:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="process pairs per mode")
    parser.add_argument("--modes", default="plain,wait", help="plain,wait (default) or one")
    parser.add_argument(
        "--child", nargs=3, metavar=("RANK", "INIT", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        rank, init_file, mode = args.child
        child(int(rank), init_file, mode)
        return
    path = [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    for mode in args.modes.split(","):
        if mode not in ("plain", "wait"):
            parser.error(f"--modes takes plain and wait, got {mode!r}")
        aborted = other = 0
        for _ in range(args.pairs):
            with tempfile.TemporaryDirectory() as folder:
                init_file = str(Path(folder) / "init")
                procs = [
                    subprocess.Popen(
                        [sys.executable, __file__, "--child", str(rank), init_file, mode],
                        env=env,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for rank in (0, 1)
                ]
                for proc in procs:
                    try:
                        code = proc.wait(timeout=120)
                    except subprocess.TimeoutExpired:  # (a peer died before a collective)
                        proc.kill()
                        code = proc.wait()
                    aborted += code == -signal.SIGABRT
                    other += code not in (0, -signal.SIGABRT)
        print(
            f"{mode}: {aborted} of {2 * args.pairs} processes aborted (SIGABRT), "
            f"{other} failed otherwise",
            flush=True,
        )


if __name__ == "__main__":
    main()
