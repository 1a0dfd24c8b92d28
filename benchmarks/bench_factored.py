"""Speed of one training step of a large output layer: dense, factored and PyTorch's options.

One step is the forward, the backward to the input ``h`` (so a network below could train) and
the update of the layer's weight, for a minibatch of ``m`` examples:

* ``dense``: ``nn.Linear`` + the spherical loss (``spherical_loss``) + ``torch.optim.SGD``;
* ``factored``: ``FactoredSphericalLoss`` + ``FactoredSGD`` (the same loss and SGD, exactly);
* ``linear_ce``: ``F.linear_cross_entropy`` (softmax cross-entropy, reference path) + SGD;
* ``linear_ce_chunked``: the same with ``options=nn.LinearCrossEntropyOptions()`` (chunked,
  never forms the ``m × D`` logits);
* ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs at 2% and 10% of the classes,
  ``div_value=4``) + SGD;
* ``factored_graph`` (``--device cuda`` only, not in the default ``--methods``): the factored
  step captured in a CUDA graph (``spherical_losses.factored.CapturedStep``: sync-free,
  ``check_every=0``, ``opt.check()`` every 100 steps) and replayed, each step copying its
  minibatch into the static inputs first;
* ``dense_graph`` (likewise): the ``dense`` step captured the same way (warm-up on a side
  stream, then forward, backward and ``SGD.step()`` in one graph), so that neither side of
  the comparison is bound by kernel launches alone. A method whose capture fails is recorded
  as failed (its error in the table), the others run on.

Targets follow a Zipf law over the classes (``p_k ∝ 1/(k+1)``, like word frequencies), which is
what the adaptive softmax's head/tail split is designed for. Each (method, size) runs in its own
subprocess, for a clean peak-memory measurement (``ru_maxrss``, or on a GPU the allocator's
peak, above its level after two steps of a tiny instance of the method) and no allocator state
shared between methods. Each method is timed in ``--rounds`` rounds interleaved with the
factored layer (one block of each per round, alternating which goes first), and its ratio to
the factored layer is the median over rounds of the two blocks' median steps: on a shared,
noisy machine a slow-down during a round hits both sides of that round's ratio. Float32.

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
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spherical_losses as sl

METHODS = ("dense", "factored", "linear_ce", "linear_ce_chunked", "adaptive")
GRAPH_METHODS = ("factored_graph", "dense_graph")  # CUDA only
FULL_SIZES = "10000:128,10000:512,100000:128,100000:512,793471:128,793471:512"
QUICK_SIZES = "2000:32,10000:128"
CPU = torch.device("cpu")


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


def build_step(
    method: str,
    num_classes: int,
    in_features: int,
    loss: str,
    lr: float,
    device: torch.device,
    batch: int = 128,
):
    """The step function of ``method``, and the layer (for the factored extras); ``batch``:
    the minibatch size that a CUDA graph method captures.
    """
    if method in GRAPH_METHODS:
        try:
            return build_graph_step(method, num_classes, in_features, loss, lr, device, batch)
        except Exception as exc:
            # (The worker dies with this as its last line: the driver records the cell as
            # failed and runs the other methods.)
            import traceback

            traceback.print_exc()
            raise RuntimeError(f"{method}: capture failed: {type(exc).__name__}: {exc}") from None
    if method == "dense":
        layer = nn.Linear(in_features, num_classes, device=device)
        opt = torch.optim.SGD(layer.parameters(), lr=lr)
        member = sl.get_member(loss)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            sl.spherical_loss(layer(h), target, member).backward()
            opt.step()

    elif method == "factored":
        layer = sl.FactoredSphericalLoss(in_features, num_classes, loss).to(device)
        opt = sl.FactoredSGD(layer, lr=lr)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            layer(h, target).backward()
            opt.step()

    elif method in ("linear_ce", "linear_ce_chunked"):
        layer = nn.Linear(in_features, num_classes, device=device)
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
        ).to(device)
        opt = torch.optim.SGD(layer.parameters(), lr=lr)

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            opt.zero_grad()
            layer(h, target).loss.backward()
            opt.step()

    else:
        names = ", ".join(METHODS + GRAPH_METHODS)
        raise ValueError(f"unknown method {method!r}; expected one of {names}")
    return step, layer


def build_graph_step(
    method: str,
    num_classes: int,
    in_features: int,
    loss: str,
    lr: float,
    device: torch.device,
    batch: int,
):
    """``factored_graph`` or ``dense_graph``: the step captured in a CUDA graph for minibatches
    of ``batch`` rows; a step copies its minibatch into the static inputs and replays it.
    """
    if device.type != "cuda":
        raise ValueError(f"{method} needs --device cuda, got {device}")
    example = (
        torch.randn(batch, in_features, device=device),
        torch.randint(num_classes, (batch,), device=device),
    )
    if method == "factored_graph":
        layer = sl.FactoredSphericalLoss(in_features, num_classes, loss).to(device)
        opt = sl.FactoredSGD(layer, lr=lr, sync_free=True, check_every=0)
        captured = sl.factored.CapturedStep(layer, opt, *example)
        count = 0

        def step(h: torch.Tensor, target: torch.Tensor) -> None:
            nonlocal count
            captured(h, target)
            count += 1
            if count % 100 == 0:
                opt.check()  # the deferred checks, outside the graph (one synchronization)

        return step, layer
    layer = nn.Linear(in_features, num_classes, device=device)
    dense_opt = torch.optim.SGD(layer.parameters(), lr=lr)
    member = sl.get_member(loss)
    static_h = example[0].clone().requires_grad_()
    static_target = example[1].clone()

    def dense_step() -> None:
        sl.spherical_loss(layer(static_h), static_target, member).backward()
        dense_opt.step()

    # PyTorch's whole-network capture: warm-up on a side stream, gradients set to None so that
    # the captured backward allocates them in the graph's pool (each replay overwrites them).
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            dense_opt.zero_grad(set_to_none=True)
            dense_step()
    torch.cuda.current_stream(device).wait_stream(side)
    dense_opt.zero_grad(set_to_none=True)
    static_h.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense_step()

    def replay(h: torch.Tensor, target: torch.Tensor) -> None:
        with torch.no_grad():
            static_h.copy_(h)
            static_target.copy_(target)
        graph.replay()

    return replay, layer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, repeats: int, device: torch.device = CPU) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Worker:
    """One method at one size, in its own process; the driver sends it timing blocks."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.threads:
            torch.set_num_threads(args.threads)
        self.args = args
        self.device = device = torch.device(args.device)
        # The baseline includes what the method needs at any size (code paths, thread pools,
        # BLAS buffers, the CUDA context): two steps of a tiny instance first.
        tiny_step, _ = build_step(args.method, 64, 8, args.loss, args.lr, device, args.batch)
        tiny_gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            tiny_step(
                torch.randn(args.batch, 8, device=device, requires_grad=True),
                zipf_targets(64, args.batch, tiny_gen).to(device),
            )
        synchronize(device)
        if device.type == "cuda":
            self.baseline = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(0)
        num_classes, in_features, batch = args.num_classes, args.in_features, args.batch
        # A pool of minibatches, cycled: the cheap methods run many steps per block.
        self.pool = 32
        self.inputs = [
            torch.randn(batch, in_features, generator=gen).to(device) for _ in range(self.pool)
        ]
        self.targets = [zipf_targets(num_classes, batch, gen).to(device) for _ in range(self.pool)]
        self.step, self.layer = build_step(
            args.method, num_classes, in_features, args.loss, args.lr, device, batch
        )
        self.count = 0
        self.log_bounds: list[float] = []
        # Warm-up: at least --warmup steps and a quarter of --min-time (allocator caches, work
        # buffers, thread pools).
        self.run_block(args.min_time / 4, args.warmup)

    def run_block(self, seconds: float, min_steps: int) -> list[float]:
        """Steps for at least ``seconds`` and ``min_steps``; the time of each."""
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < min_steps or time.perf_counter() - started < seconds:
            i = self.count % self.pool
            h = self.inputs[i].requires_grad_()
            h.grad = None
            synchronize(self.device)
            start = time.perf_counter()
            self.step(h, self.targets[i])
            synchronize(self.device)
            times.append(time.perf_counter() - start)
            if self.args.method == "factored":
                hi, lo = self.layer._session.sigma  # bounds on U's singular values
                self.log_bounds.append(math.log(hi / lo))
            self.count += 1
        return times

    def back_to_back(self, steps: int) -> float:
        """Seconds per step over ``steps`` steps with one synchronization at each end (the
        timed blocks synchronize around every step, which adds its latency to each).
        """
        synchronize(self.device)
        start = time.perf_counter()
        for i in range(steps):
            h = self.inputs[(self.count + i) % self.pool].requires_grad_()
            h.grad = None
            self.step(h, self.targets[(self.count + i) % self.pool])
        synchronize(self.device)
        self.count += steps
        return (time.perf_counter() - start) / steps

    def finish(self) -> dict:
        device = self.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - self.baseline
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.baseline
        result: dict = {"peak_mb": peak / 2**20}
        if device.type == "cuda" and self.args.method in ("factored", "dense", *GRAPH_METHODS):
            result["back_to_back_s"] = self.back_to_back(100)
        if self.args.method == "factored":
            layer = self.layer
            growth = [b - a for a, b in itertools.pairwise(self.log_bounds) if b >= a]
            d, m = layer.U.shape[0], self.args.batch
            result.update(
                bound_growth=statistics.fmean(growth) if growth else 0.0,
                check_s=median_time(lambda: torch.linalg.svdvals(layer.U), 3, device),
                repair_s=median_time(layer.repair, 2, device),
                woodbury=4 * m * d * d + 14 * m * m * d + m**3 < 10 * d**3,
            )
        return result


def serve(args: argparse.Namespace) -> None:
    """The worker's loop: ``block SECONDS STEPS`` times a block, ``finish`` ends."""
    worker = Worker(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "block":
            times = worker.run_block(float(rest[0]), int(rest[1]))
            print(json.dumps({"times": times}), flush=True)
        elif command == "finish":
            print(json.dumps(worker.finish()), flush=True)
            return


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


def matmul_rate(batch: int, d: int, device: torch.device, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of float32 (m×d)@(d×d) and (d×d)@(d×d) products on this machine."""
    rates = {}
    for name, (rows, inner) in {"m_d_d": (batch, d), "d_d_d": (d, d)}.items():
        a = torch.randn(rows, inner, device=device)
        b = torch.randn(inner, d, device=device)
        for _ in range(3):
            a @ b
        # Many products per timing on a GPU, where one takes microseconds.
        count = 100 if device.type == "cuda" else 1

        def product(a: torch.Tensor = a, b: torch.Tensor = b, count: int = count) -> None:
            for _ in range(count):
                a @ b

        seconds = median_time(product, repeats, device) / count
        rates[name] = 2.0 * rows * inner * d / seconds / 1e9
    return rates


class WorkerProcess:
    """A :class:`Worker` in a subprocess (a clean peak-memory measurement per method)."""

    def __init__(
        self,
        args: argparse.Namespace,
        method: str,
        num_classes: int,
        d: int,
        env: dict[str, str] | None = None,
    ) -> None:
        command = [sys.executable, __file__, "--worker", method]
        command += ["--num-classes", str(num_classes), "--in-features", str(d)]
        command += ["--batch", str(args.batch), "--warmup", str(args.warmup)]
        command += ["--min-time", str(args.min_time), "--loss", args.loss, "--lr", str(args.lr)]
        command += ["--device", args.device, "--threads", str(args.threads)]
        self.method = method
        pipe = subprocess.PIPE
        # stderr to a file: a pipe nobody reads until the end could fill and block the worker.
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, stdin=pipe, stdout=pipe, stderr=self.stderr, text=True, env=env
        )
        self.error: list[str] | None = None
        self._read()

    def _read(self) -> dict | None:
        if self.error is None:
            line = self.process.stdout.readline()
            if line:
                return json.loads(line)
            code = self.process.wait()
            self.stderr.seek(0)
            # The last line of stderr, or the exit status (a worker killed for memory says
            # nothing).
            self.error = self.stderr.read().strip().splitlines()[-1:] or [f"exit status {code}"]
        return None

    def block(self, seconds: float, steps: int) -> list[float] | None:
        if self.error is None:
            self.process.stdin.write(f"block {seconds} {steps}\n")
            self.process.stdin.flush()
            reply = self._read()
            return reply["times"] if reply else None
        return None

    def finish(self) -> dict:
        result = None
        if self.error is None:
            self.process.stdin.write("finish\n")
            self.process.stdin.flush()
            result = self._read()
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()
        return {"error": self.error} if result is None else result


def run_size(args: argparse.Namespace, methods: list[str], num_classes: int, d: int) -> list:
    """Every method at one size, each timed in rounds interleaved with the factored layer.

    For each other method, its worker and the factored layer's run ``--rounds`` rounds of one
    block each (at least ``--min-time / --rounds`` seconds and 2 steps), alternating which goes
    first; the method's time relative to the factored layer's is the median over rounds of
    the ratio of the two blocks' median steps. A slow-down of the machine during a round hits
    both sides of its ratio.
    """
    block = args.min_time / args.rounds
    others = [m for m in methods if m != "factored"]
    factored = WorkerProcess(args, "factored", num_classes, d) if "factored" in methods else None
    results: dict[str, dict] = {}
    factored_times: list[float] = []
    for method in others:
        worker = WorkerProcess(args, method, num_classes, d)
        own, ratios = [], []
        for r in range(args.rounds):
            pair = [worker, factored] if r % 2 == 0 else [factored, worker]
            blocks = {}
            for w in pair:
                if w is not None:
                    # A pause first: the other process's threads stop spinning, its caches cool.
                    time.sleep(args.pause)
                    blocks[w.method] = w.block(block, 2)
            if blocks.get(method):
                own += blocks[method]
            if blocks.get("factored"):
                factored_times += blocks["factored"]
                if blocks.get(method):
                    ratios.append(
                        statistics.median(blocks[method]) / statistics.median(blocks["factored"])
                    )
        result = worker.finish()
        if own:
            result.update(median_s=statistics.median(own), steps=len(own))
        if ratios:
            result.update(ratio=statistics.median(ratios), ratio_range=(min(ratios), max(ratios)))
        results[method] = {"method": method, **result}
        report(num_classes, d, results[method])
    if factored is not None:
        if not others:  # the factored layer alone: its own rounds
            for _ in range(args.rounds):
                factored_times += factored.block(block, 2) or []
        result = factored.finish()
        if factored_times:
            result.update(median_s=statistics.median(factored_times), steps=len(factored_times))
        results["factored"] = {"method": "factored", **result}
        report(num_classes, d, results["factored"])
    return [results[m] for m in methods if m in results]


def report(num_classes: int, d: int, result: dict) -> None:
    shown = f"{result['median_s'] * 1e3:.3g} ms" if "median_s" in result else result
    if "ratio" in result:
        low, high = result["ratio_range"]
        shown += f", {result['ratio']:.3g}x the factored layer (rounds: {low:.3g} to {high:.3g})"
    print(f"D={num_classes} d={d} {result['method']}: {shown}", file=sys.stderr, flush=True)


def format_table(rows: list[dict], args: argparse.Namespace, rates: dict) -> str:
    ms = lambda seconds: f"{seconds * 1e3:.3g}"  # noqa: E731
    device = torch.device(args.device)
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else "GPU"
    lines = [
        f"# Factored output layer: time of one training step ({where}, float32)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {threads}, "
        f"torch {torch.__version__}. m = {args.batch}, loss = {args.loss!r}, lr = {args.lr}. "
        f"Each method runs in its own process, interleaved with the factored layer's: "
        f"{args.rounds} rounds of one block each (at least {args.min_time / args.rounds:.2g} s "
        "and 2 steps), alternating which goes first, after at least "
        f"{args.warmup} warm-up steps and {args.min_time / 4:g} s. A time is the median step "
        "over all of a method's blocks; a ratio is the median over rounds of the two blocks' "
        "median steps. Zipf targets. Adaptive softmax cutoffs: 2% and 10% of the classes, "
        "div_value 4. `F.linear_cross_entropy` is softmax cross-entropy (reference path; "
        "'chunked' with `LinearCrossEntropyOptions()`).",
        "",
        "Time per step (ms) and each method's time relative to the factored layer's "
        "(amortized: median plus an upper bound on the share of checks and repairs; "
        "achieved / ideal: the median over rounds, then the range over rounds):",
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
            scale = t_fact / amortized if t_fact else 0.0
            ratio = r["ratio"] * scale if "ratio" in r else None
            cells.append(f"{ratio:.1f}" if ratio else "–")
            if method == "dense":
                cells.append(f"{ideal:.1f}")
                if ratio:
                    low, high = (x * scale / ideal for x in r["ratio_range"])
                    cells.append(f"**{ratio / ideal:.2f}** ({low:.2f}–{high:.2f})")
                else:
                    cells.append("–")
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


def graph_table(rows: list) -> str:
    """The CUDA graph methods' times against the eager factored step's (empty without them)."""
    if not any(r["method"] in GRAPH_METHODS for _, results in rows for r in results):
        return ""

    def ms(r: dict) -> str:
        shown = f"{r['median_s'] * 1e3:.3g}" if "median_s" in r else "–"
        if "back_to_back_s" in r:
            shown += f" ({r['back_to_back_s'] * 1e3:.3g})"
        return shown

    lines = [
        "",
        "Captured in a CUDA graph (each step copies its minibatch into the static inputs, "
        "then replays): time per step in ms, synchronized around each step, and in "
        "parentheses over 100 steps back to back (one synchronization at each end):",
        "",
        "| D | d | factored | factored graph | dense graph | factored / factored graph "
        "| dense graph / factored graph |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (num_classes, in_features), results in rows:
        get = {r["method"]: r for r in results}
        eager, fg, dg = (get.get(m, {}) for m in ("factored", "factored_graph", "dense_graph"))
        ratio = lambda a, b: (  # noqa: E731
            f"{a['median_s'] / b['median_s']:.3g}" if "median_s" in a and "median_s" in b else "–"
        )
        lines.append(
            f"| {num_classes} | {in_features} | {ms(eager)} | {ms(fg)} | {ms(dg)} "
            f"| {ratio(eager, fg)} | {ratio(dg, fg)} |"
        )
    return "\n".join(lines) + "\n"


def exchange_table(rows: list, batch: int) -> list[str]:
    """Bytes each process receives per step under torchrun with ``w`` processes (float32):
    ``FactoredSGD(process_group=...)`` all-gathers every process's ``m`` rows of
    ``3(d+1) + 5`` numbers (h with the bias 1, α β γ, W_c, H Q, s, the target) and a header
    of four float64 numbers (row count, lr, weight decay, a problem flag);
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
            factored = (world - 1) * (4 * 8 + batch * (3 * d + 5) * 4)
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
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument(
        "--pause", type=float, default=0.05, help="seconds between blocks (default 0.05)"
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=1.0,
        help="seconds of timed steps per method and pairing, at least (default 1)",
    )
    parser.add_argument("--loss", default="taylor", help="spherical member of dense/factored")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", default="benchmarks/results/factored_cpu.md")
    parser.add_argument("--worker", choices=METHODS + GRAPH_METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--num-classes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--in-features", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.method = args.worker
        serve(args)
        return
    if args.quick:
        args.sizes = QUICK_SIZES
    if args.warmup is None:
        args.warmup = 2 if args.quick else 3
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if args.device.split(":")[0] != "cuda":
        for method in set(methods) & set(GRAPH_METHODS):
            print(f"note: {method} skipped: it needs --device cuda", file=sys.stderr)
        methods = [m for m in methods if m not in GRAPH_METHODS]
    sizes = parse_sizes(args.sizes)
    device = torch.device(args.device)
    rates = {d: matmul_rate(args.batch, d + 1, device) for d in sorted({d for _, d in sizes})}
    rows = []
    for num_classes, in_features in sizes:
        rows.append(((num_classes, in_features), run_size(args, methods, num_classes, in_features)))
    table = format_table(rows, args, rates) + graph_table(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"saved {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
