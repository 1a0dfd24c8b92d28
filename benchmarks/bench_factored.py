"""Speed of one training step of a large output layer: dense, factored and PyTorch's options.

One step is the forward, the backward to the input ``h`` (so a network below could train) and
the update of the layer's weight, for a minibatch of ``m`` examples:

* ``dense``: ``nn.Linear`` + the spherical loss (``spherical_loss``) + ``torch.optim.SGD``;
* ``factored``: ``FactoredSphericalLoss`` + ``FactoredSGD`` (the same loss and SGD, exactly);
* ``linear_ce``: ``F.linear_cross_entropy`` (softmax cross-entropy, reference path) + SGD;
* ``linear_ce_chunked``: the same with ``options=nn.LinearCrossEntropyOptions()`` (chunked,
  never forms the ``m × D`` logits);
* ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs at 2% and 10% of the classes,
  ``div_value=4``) + SGD.

Targets follow a Zipf law over the classes (``p_k ∝ 1/(k+1)``, like word frequencies), which is
what the adaptive softmax's head/tail split is designed for. Each (method, size) runs in its own
subprocess, for a clean peak-memory measurement (``ru_maxrss`` above its level after two steps
of a tiny instance of the method) and no allocator state shared between methods. Times are
medians over at least ``--repeats`` steps and ``--min-time`` seconds, after a warm-up,
float32.

The factored layer's repairs are data-driven, not periodic: a step multiplies the bound on the
condition number of ``U`` by ``(a+ρ)/(a−ρ)``; when the bound exceeds ``max_condition`` the
exact singular values are computed (``O(d³)``), and only if they are out of range is ``U``
folded into ``V`` (``O(D d²)``). After a check the bound restarts below ``max_condition/4``, so
checks and repairs together happen at most once per ``log(4)/g`` steps, ``g`` the bound's
growth per step measured in the run. The "amortized" time adds (check + repair time) ·
``g/log 4`` to the median step: an upper bound on their share.

Examples
--------
Quick check (small sizes, about half a minute)::

    python benchmarks/bench_factored.py --quick

The full table (D ∈ {10,000, 100,000, 793,471}, d ∈ {128, 512}, m = 128)::

    python benchmarks/bench_factored.py --out benchmarks/results/factored_cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spherical_losses as sl

METHODS = ("dense", "factored", "linear_ce", "linear_ce_chunked", "adaptive")
FULL_SIZES = "10000:128,10000:512,100000:128,100000:512,793471:128,793471:512"
QUICK_SIZES = "2000:32,10000:128"


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        num_classes, _, in_features = item.partition(":")
        sizes.append((int(num_classes), int(in_features)))
    return sizes


def adaptive_cutoffs(num_classes: int) -> list[int]:
    return [max(2, num_classes // 50), max(3, num_classes // 10)]


def zipf_targets(num_classes: int, count: int, gen: torch.Generator) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float64)
    return torch.multinomial(weights, count, replacement=True, generator=gen)


# --------------------------------------------------------------------------------------------
# one method at one size (run in a subprocess)


def build_step(method: str, num_classes: int, in_features: int, loss: str, lr: float):
    """The step function of ``method``, and the layer (for the factored extras)."""
    if method == "dense":
        layer = nn.Linear(in_features, num_classes)
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        member = sl.get_member(loss)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            sl.spherical_loss(layer(h), target, member).backward()
            opt.step()

    elif method == "factored":
        layer = sl.FactoredSphericalLoss(in_features, num_classes, loss)
        opt = sl.FactoredSGD(layer, lr=lr)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            layer(h, target).backward()
            opt.step()

    elif method in ("linear_ce", "linear_ce_chunked"):
        layer = nn.Linear(in_features, num_classes)
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        options = nn.LinearCrossEntropyOptions() if method == "linear_ce_chunked" else None

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            F.linear_cross_entropy(
                h, layer.weight, target, linear_bias=layer.bias, options=options
            ).backward()
            opt.step()

    elif method == "adaptive":
        layer = nn.AdaptiveLogSoftmaxWithLoss(
            in_features, num_classes, adaptive_cutoffs(num_classes), div_value=4.0
        )
        opt = torch.optim.SGD(layer.parameters(), lr=lr)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            layer(h, target).loss.backward()
            opt.step()

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return step, layer


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    # The baseline includes what the method needs at any size (code paths, thread pools and
    # BLAS buffers): two steps of a tiny instance first.
    tiny_step, _ = build_step(args.method, 64, 8, args.loss, args.lr)
    tiny_gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        tiny_step(
            torch.randn(args.batch, 8, requires_grad=True), zipf_targets(64, args.batch, tiny_gen)
        )
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    num_classes, in_features, batch = args.num_classes, args.in_features, args.batch
    # A pool of minibatches, cycled: the cheap methods run many steps (see --min-time).
    pool = 32
    inputs = [torch.randn(batch, in_features, generator=gen) for _ in range(pool)]
    targets = [zipf_targets(num_classes, batch, gen) for _ in range(pool)]
    step, layer = build_step(args.method, num_classes, in_features, args.loss, args.lr)

    # Warm-up: at least --warmup steps and a quarter of --min-time (allocator caches, work
    # buffers, thread pools); then at least --repeats timed steps and --min-time seconds, so
    # a millisecond step is a median over hundreds of steps, not a handful.
    times, log_bounds = [], []
    i, started, timing = 0, time.perf_counter(), False
    while True:
        if not timing and i >= args.warmup and time.perf_counter() - started >= args.min_time / 4:
            timing, started, i = True, time.perf_counter(), 0
        if timing and i >= args.repeats and time.perf_counter() - started >= args.min_time:
            break
        h = inputs[i % pool].requires_grad_()
        h.grad = None
        start = time.perf_counter()
        step(h, targets[i % pool])
        elapsed = time.perf_counter() - start
        if timing:
            times.append(elapsed)
        if args.method == "factored":
            hi, lo = layer._session.sigma  # bounds on U's singular values (repair estimate)
            log_bounds.append(math.log(hi / lo))
        i += 1
    result = {
        "method": args.method,
        "num_classes": num_classes,
        "in_features": in_features,
        "median_s": statistics.median(times),
        "steps": len(times),
        "mean_s": statistics.fmean(times),
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024,
    }
    if args.method == "factored":
        growth = [b - a for a, b in itertools.pairwise(log_bounds) if b >= a]
        d = layer.U.shape[0]
        result.update(
            bound_growth=statistics.fmean(growth) if growth else 0.0,
            check_s=median_time(lambda: torch.linalg.svdvals(layer.U), 3),
            repair_s=median_time(layer.repair, 2),
            woodbury=4 * batch * d * d + 14 * batch * batch * d + batch**3 < 10 * d**3,
        )
    return result


# --------------------------------------------------------------------------------------------
# the driver


def factored_flops(batch: int, d: int, woodbury: bool) -> float:
    """Floating-point operations of one factored step (forward, backward, update), counting
    the matrix products (2 per multiply-add) with one extra term of the series for M⁻¹.
    """
    m = batch
    if woodbury:
        madds = 8 * m * d * d + 7 * m * m * d + d * d
    else:
        madds = 6 * m * d * d + 5 * d**3
    return 2.0 * madds


def matmul_rate(batch: int, d: int, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of float32 (m×d)@(d×d) and (d×d)@(d×d) products on this machine."""
    rates = {}
    for name, (rows, inner) in {"m_d_d": (batch, d), "d_d_d": (d, d)}.items():
        a, b = torch.randn(rows, inner), torch.randn(inner, d)
        for _ in range(3):
            a @ b
        seconds = median_time(lambda a=a, b=b: a @ b, repeats)
        rates[name] = 2.0 * rows * inner * d / seconds / 1e9
    return rates


def run_one(args: argparse.Namespace, method: str, num_classes: int, in_features: int) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--num-classes",
        str(num_classes),
        "--in-features",
        str(in_features),
        "--batch",
        str(args.batch),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--min-time",
        str(args.min_time),
        "--loss",
        args.loss,
        "--lr",
        str(args.lr),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], args: argparse.Namespace, rates: dict) -> str:
    ms = lambda seconds: f"{seconds * 1e3:.3g}"  # noqa: E731
    lines = [
        "# Factored output layer: time of one training step (CPU, float32)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"m = {args.batch}, loss = {args.loss!r}, lr = {args.lr}; median over at least "
        f"{args.repeats} steps and {args.min_time:g} s of steps, after at least {args.warmup} "
        f"warm-up steps and {args.min_time / 4:g} s; Zipf targets. Adaptive softmax cutoffs: 2% "
        "and 10% of the classes, div_value 4. `F.linear_cross_entropy` is softmax "
        "cross-entropy (reference path; 'chunked' with `LinearCrossEntropyOptions()`).",
        "",
        "Time per step (ms) and each method's time relative to the factored layer's "
        "(amortized: median plus an upper bound on the share of checks and repairs):",
        "",
        "| D | d | dense | factored | factored amortized | linear_ce | linear_ce chunked "
        "| adaptive | dense / factored | ideal D/(4d) | achieved / ideal | linear_ce / factored "
        "| chunked / factored | adaptive / factored |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    efficiency = [
        "",
        "The factored step against this machine's float32 matrix-product rate (GFLOP/s of "
        "(m×d)@(d×d) and (d×d)@(d×d), measured in the same run), peak memory above the level "
        "after two steps of a tiny instance of the method (MB; includes the weight and its "
        "gradient), and the repairs' cost:",
        "",
        "| D | d | factored GFLOP | factored GFLOP/s | matmul GFLOP/s (m×d×d / d×d×d) "
        "| % of matmul rate | peak MB dense / factored / linear_ce / chunked / adaptive "
        "| check ms | repair ms | bound growth per step | checks+repairs per step ≤ |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (num_classes, in_features), results in rows:
        get = {r["method"]: r for r in results}
        fact = get.get("factored", {})
        t_fact = fact.get("median_s")
        rate = 0.0
        if t_fact:
            per_step = fact["bound_growth"] / math.log(4.0)
            amortized = t_fact + (fact["check_s"] + fact["repair_s"]) * per_step
        cells = [str(num_classes), str(in_features)]
        for method in METHODS:
            r = get.get(method, {})
            cells.append(ms(r["median_s"]) if "median_s" in r else "–")
            if method == "factored":
                cells.append(ms(amortized) if t_fact else "–")
        ideal = num_classes / (4 * in_features)
        for method in ("dense", "linear_ce", "linear_ce_chunked", "adaptive"):
            r = get.get(method, {})
            ratio = r["median_s"] / amortized if "median_s" in r and t_fact else None
            cells.append(f"{ratio:.1f}" if ratio else "–")
            if method == "dense":
                cells.append(f"{ideal:.1f}")
                cells.append(f"{ratio / ideal:.2f}" if ratio else "–")
        lines.append("| " + " | ".join(cells) + " |")
        if t_fact:
            d = in_features + 1
            flops = factored_flops(args.batch, d, fact["woodbury"])
            rate = flops / t_fact / 1e9
            mm = rates[in_features]
            peaks = " / ".join(
                f"{get[name]['peak_mb']:.0f}" if "peak_mb" in get.get(name, {}) else "–"
                for name in METHODS
            )
            efficiency.append(
                f"| {num_classes} | {in_features} | {flops / 1e9:.3f} | {rate:.1f} "
                f"| {mm['m_d_d']:.0f} / {mm['d_d_d']:.0f} "
                f"| {100 * rate / max(mm.values()):.0f}% | {peaks} "
                f"| {ms(fact['check_s'])} | {ms(fact['repair_s'])} | {fact['bound_growth']:.2e} "
                f"| {fact['bound_growth'] / math.log(4.0):.1e} |"
            )
    errors = [
        f"- {r['method']} at D={n}, d={d}: {r['error']}"
        for (n, d), results in rows
        for r in results
        if "error" in r
    ]
    if errors:
        efficiency += ["", "Errors:", *errors]
    return "\n".join(lines + efficiency + exchange_table(rows, args.batch)) + "\n"


def exchange_table(rows: list, batch: int) -> list[str]:
    """Bytes each process receives per step under torchrun with ``w`` processes (float32):
    ``FactoredSGD(process_group=...)`` all-gathers every process's ``m`` rows of
    ``3(d+1) + 5`` numbers (h with the bias 1, α β γ, W_c, H Q, s, the target) and a row count;
    ``DistributedDataParallel`` on a dense layer all-reduces its ``D × (d+1)`` gradient (a ring
    all-reduce receives ``2(w−1)/w`` of it). The byte counts of the factored exchange are
    those that ``tests/test_factored_distributed.py`` checks.
    """
    lines = [
        "",
        "Under torchrun, per step and process: bytes received by the factored layer's exchange "
        f"(m = {batch} rows per process) against a ring all-reduce of the dense gradient:",
        "",
        "| D | d | w | factored exchange | dense all-reduce | dense / factored |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for (num_classes, in_features), _ in rows:
        d = in_features + 1
        for world in (2, 8):
            factored = (world - 1) * (8 + batch * (3 * d + 5) * 4)
            dense = 2 * (world - 1) / world * num_classes * d * 4
            lines.append(
                f"| {num_classes} | {in_features} | {world} | {factored / 2**20:.3g} MiB "
                f"| {dense / 2**20:.3g} MiB | {dense / factored:,.0f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=FULL_SIZES, help="D:d pairs, comma-separated")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}")
    parser.add_argument("--batch", type=int, default=128, help="m, examples per step")
    parser.add_argument("--warmup", type=int, help="warm-up steps (default 3, quick 2)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 10, quick 5)")
    parser.add_argument(
        "--min-time", type=float, default=1.0, help="seconds of timed steps, at least (default 1)"
    )
    parser.add_argument("--loss", default="taylor", help="spherical member of dense/factored")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default="benchmarks/results/factored_cpu.md")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-features", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.method = args.worker
        print(json.dumps(run_worker(args)))
        return
    if args.quick:
        args.sizes = QUICK_SIZES
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.repeats is None:
        args.repeats = 5 if args.quick else 10
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    sizes = parse_sizes(args.sizes)
    rates = {d: matmul_rate(args.batch, d + 1) for d in sorted({d for _, d in sizes})}
    rows = []
    for num_classes, in_features in sizes:
        results = []
        for method in methods:
            result = run_one(args, method, num_classes, in_features)
            results.append(result)
            shown = f"{result['median_s'] * 1e3:.3g} ms" if "median_s" in result else result
            print(f"D={num_classes} d={in_features} {method}: {shown}", file=sys.stderr)
        rows.append(((num_classes, in_features), results))
    table = format_table(rows, args, rates)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
