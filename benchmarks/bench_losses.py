"""Forward + backward time and peak memory of every member against ``F.cross_entropy``.

Same logits, same run, float32 on the CPU. Times are medians over interleaved rounds (each
method timed in turn, round after round, so that load on a shared machine hits all alike);
ratios are against ``F.cross_entropy`` in the same round. The compiled columns time
``torch.compile(loss, fullgraph=True)`` (inductor) of each method, forward + backward, against
compiled ``F.cross_entropy``. Peak memory is measured in a fresh
process per method and size: the rise of the peak resident set size over a forward+backward,
beyond the logits themselves (glibc is told to give large blocks back to the system, so that
the resident set follows what is live).

    python benchmarks/bench_losses.py                  # the full table
    python benchmarks/bench_losses.py --quick          # small sizes, a few seconds
    python benchmarks/bench_losses.py --no-compile     # without the compiled columns
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spherical_losses as sl

SIZES = [(4096, 10), (4096, 1000), (2048, 10000), (256, 100000)]
QUICK = [(512, 10), (512, 1000)]
# Every registered member (log_softmax is F.cross_entropy behind the library's checks), and
# the bound at a fixed ξ, which skips the search for the optimal one.
MEMBERS = [*sl.member_names(), "softmax_bound(xi=1)"]


def make_loss(method: str):
    if method == "cross_entropy":
        return F.cross_entropy
    name, _, opts = method.partition("(")
    options = dict(kv.split("=") for kv in opts.rstrip(")").split(",") if kv)
    return sl.get_loss(name, **{k: float(v) for k, v in options.items()})


def data(n: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, c, generator=g).requires_grad_(), torch.randint(0, c, (n,), generator=g)


COMPILED = " [compiled]"


def time_methods(
    n: int, c: int, methods: list[str], rounds: int, budget: float, compiled: bool = True
) -> dict:
    """``{method: {"ms", "ratio"}}``, and ``{method + COMPILED: ...}`` with ``compiled``."""
    x, t = data(n, c)
    fns = {m: make_loss(m) for m in methods}
    if compiled:
        torch._dynamo.reset()
        for m in methods:
            fns[m + COMPILED] = torch.compile(fns[m], fullgraph=True, dynamic=False)

    def once(fn) -> None:
        fn(x, t).backward()
        x.grad = None

    for fn in fns.values():  # warm-up (and compilation), and the number of calls per timing
        once(fn)
    start = time.perf_counter()
    once(fns["cross_entropy"])
    per_call = time.perf_counter() - start
    number = max(1, int(budget / max(per_call, 1e-6)))
    times: dict[str, list[float]] = {m: [] for m in fns}
    ratios: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(rounds):
        this_round = {}
        for m, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                once(fn)
            this_round[m] = (time.perf_counter() - start) / number
            times[m].append(this_round[m])
        for m in fns:
            base = "cross_entropy" + (COMPILED if m.endswith(COMPILED) else "")
            ratios[m].append(this_round[m] / this_round[base])
    return {
        m: {"ms": 1e3 * statistics.median(times[m]), "ratio": statistics.median(ratios[m])}
        for m in fns
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_probe(method: str, n: int, c: int) -> None:
    """Run in a fresh process: prints the peak-RSS rise (bytes) over one forward+backward."""
    x, t = data(n, c)
    fn = make_loss(method)
    fn(x, t).backward()  # the first call also sets up autograd and the thread pool
    x.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one
    before = _status_kib("VmRSS")
    fn(x, t).backward()
    print(json.dumps({"rise": (_status_kib("VmHWM") - before) * 1024}))


def peak_memory(method: str, n: int, c: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, __file__, "--probe", method, str(n), str(c)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["rise"] / 2**20


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sizes", nargs="+", metavar="NxC", help="the sizes to run, e.g. 8x5 (a smoke run)"
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--budget", type=float, default=0.3, help="seconds per method per round")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled columns")
    p.add_argument("--out", default="benchmarks/results/losses_cpu.md")
    p.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        peak_memory_probe(args.probe[0], int(args.probe[1]), int(args.probe[2]))
        return
    sizes = QUICK if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    methods = ["cross_entropy", *MEMBERS]
    flags = "".join(
        f" --{f}" for f in ("quick", "no-compile") if getattr(args, f.replace("-", "_"))
    )
    flags += f" --sizes {' '.join(args.sizes)}" if args.sizes else ""
    lines = [
        f"Machine: {machine()}",
        f"Command: `python benchmarks/bench_losses.py{flags}`",
        "",
        "| N × C | method | fwd+bwd (ms) | time / cross_entropy | compiled (ms) "
        "| compiled / cross_entropy compiled | peak memory (MiB) | memory / cross_entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, c in sizes:
        result = time_methods(n, c, methods, args.rounds, args.budget, not args.no_compile)
        mem = {} if args.no_memory else {m: peak_memory(m, n, c) for m in methods}
        for m in methods:
            r = result[m]
            mem_cells = "— | —"
            if mem:
                base = mem["cross_entropy"]
                rel = f"{mem[m] / base:.2f}" if base > 1 else "n/a (below resolution)"
                mem_cells = f"{mem[m]:.1f} | {rel}"
            rc = result.get(m + COMPILED)
            compiled_cells = f"{rc['ms']:.3f} | {rc['ratio']:.2f}" if rc else "— | —"
            lines.append(
                f"| {n} × {c} | {m} | {r['ms']:.3f} | {r['ratio']:.2f} | {compiled_cells} "
                f"| {mem_cells} |"
            )
        print("\n".join(lines[-len(methods) :]), flush=True)
    table = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"\n{table}\nwritten to {out}")


if __name__ == "__main__":
    main()
