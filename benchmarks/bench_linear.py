"""Forward + backward of a large output layer and its loss: the linear path without logits
against the dense member and ``F.linear_cross_entropy``.

One step is the forward and the backward to the input ``h`` (m × d) and to the weight ``W``
(D × d), float32, no bias, for targets drawn uniformly:

* ``linear``: ``sl.linear_spherical_loss(h, W, y, loss)`` (``method="auto"``: the Gram matrix
  ``WᵀW`` wherever the arithmetic model says it is cheaper, chunked logits below);
* ``linear_chunked``: the same with ``method="chunked"`` (the logits a block at a time);
* ``dense``: ``sl.spherical_loss(F.linear(h, W), y, loss)``, the same loss from the logits;
* ``linear_ce``: ``F.linear_cross_entropy`` (softmax cross-entropy), reference path;
* ``linear_ce_chunked``: the same with ``options=nn.LinearCrossEntropyOptions()``;
* ``liger``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss``, and ``cce``: Cut
  Cross-Entropy's ``linear_cross_entropy`` (GPU only, optional).

Methods whose library is missing (``F.linear_cross_entropy`` before torch 2.12, Liger or Cut
Cross-Entropy not installed) are skipped with a note under the table.

With ``--lm``, a whole language model instead (embedding and a one-layer LSTM of width d, the
output layer, AdamW on every parameter; ``m`` tokens per step in sequences of 128, from a
synthetic Zipf stream: speed only), in tokens per second, at D ∈ {100,000, 793,471}, d = 512,
4,096 tokens per step by default:

* ``linear_taylor``: :class:`~spherical_losses.LinearSphericalLoss` (Taylor);
* ``log_softmax``: ``nn.Linear`` + ``F.cross_entropy``;
* ``linear_ce``: chunked ``F.linear_cross_entropy``;
* ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs 2,000 / 10,000 / 50,000 below D).

On the CPU each (method, size) runs in its own subprocess: a clean peak-memory figure
(``ru_maxrss`` above the level after a tiny warm-up; it includes ``W``, its gradient and the
inputs) and no allocator state shared between methods. On a GPU (``--device cuda``) all run
in one process (starting one costs seconds of device time): the peak is the allocator's
(``torch.cuda.max_memory_allocated``) above what was allocated before the cell, which frees
everything it made; ``--isolate`` restores the subprocesses. A step's time is the median of
``--repeats`` steps after one warm-up step, each step ending with a synchronization.

The table gives each method's time over the linear path's (``× linear``) and, on the dense
row, the arithmetic model's ideal ratio ``3 m D d / (2 D d² + 2 m d²)`` (multiply-adds of the
matrix products, :func:`spherical_losses.linear.arithmetic_cost`) and the fraction of it
reached. Cells whose estimated memory exceeds ``--memory-gb`` are skipped and listed as such.

Examples
--------
A smoke run at tiny sizes (seconds)::

    python benchmarks/bench_linear.py --sizes 256:2000:32 --repeats 1

The full table (on a quiet machine; the large dense cells take minutes each)::

    python benchmarks/bench_linear.py --out benchmarks/results/linear_cpu.md

The language model::

    python benchmarks/bench_linear.py --lm --out benchmarks/results/linear_lm_cpu.md
    python benchmarks/bench_linear.py --lm --sizes 512:3000:32 --repeats 1   # a smoke run

On a GPU, the issue's whole grid (cells estimated above ``--memory-gb``, by default 72% of the
GPU's memory, are skipped) and the language model::

    python benchmarks/bench_linear.py --device cuda --repeats 3 \\
        --out benchmarks/results/linear_gpu.md
    python benchmarks/bench_linear.py --device cuda --lm --repeats 3 \\
        --out benchmarks/results/linear_lm_gpu.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import itertools
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spherical_losses as sl
from spherical_losses.linear import arithmetic_cost

METHODS = ("linear", "linear_chunked", "dense", "linear_ce", "linear_ce_chunked", "liger", "cce")
DEFAULT_METHODS = ("linear", "dense", "linear_ce", "linear_ce_chunked")
GPU_METHODS = (*DEFAULT_METHODS, "liger", "cce")  # the default with --device cuda
LM_METHODS = ("linear_taylor", "log_softmax", "linear_ce", "adaptive")
LM_TOKENS, LM_D, LM_d = 4096, (100_000, 793_471), 512
FULL_M = (1024, 4096, 16384)
FULL_D = (10_000, 100_000, 793_471)
FULL_d = (256, 512, 1024)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``m:D:d,m:D:d,...``."""
    sizes = []
    for item in text.split(","):
        m, D, d = (int(x) for x in item.split(":"))
        sizes.append((m, D, d))
    return sizes


def unavailable(method: str, device: str) -> str | None:
    """Why ``method`` cannot run here (a missing library), or None."""
    if method in ("linear_ce", "linear_ce_chunked") and not hasattr(F, "linear_cross_entropy"):
        return f"F.linear_cross_entropy does not exist in torch {torch.__version__}"
    packages = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}
    if method in packages:
        if importlib.util.find_spec(packages[method]) is None:
            return f"{packages[method]} is not installed"
        if not device.startswith("cuda"):
            return f"{packages[method]} runs on a GPU only"
    return None


def estimated_bytes(method: str, m: int, D: int, d: int) -> int:
    """A rough float32 peak of one step: the layer, its gradient, and the method's own."""
    layer = 2 * D * d + 2 * m * d
    if method == "dense":  # the logits, their gradient and the product's saved copy
        own = 3 * m * D
    elif method == "linear_ce":  # logits, log-softmax and their gradient
        own = 4 * m * D
    elif method in ("linear_ce_chunked", "liger", "cce"):  # gradients of W and h, chunks
        own = 2 * D * d + 2 * m * d
    elif method == "linear_chunked":
        own = 2 * (1 << 22)
    else:  # the Gram matrix and O(m d) per-row tensors
        own = d * d + 8 * m * d
    return 4 * (layer + own)


def lm_estimated_bytes(method: str, tokens: int, D: int, d: int) -> int:
    """A rough float32 peak of a language-model step: embedding and output layer with their
    gradients and AdamW's two moments, and the output layer's own.
    """
    own = 3 * tokens * D if method == "log_softmax" else 4 * tokens * d
    return 4 * (8 * D * d + own)


def build_step(method: str, loss: str):
    member = sl.get_member(loss)
    if method in ("linear", "linear_chunked"):
        how = "auto" if method == "linear" else "chunked"

        def step(h, W, y):
            return sl.linear_spherical_loss(h, W, y, member, method=how)

    elif method == "dense":

        def step(h, W, y):
            return sl.spherical_loss(F.linear(h, W), y, member)

    elif method in ("linear_ce", "linear_ce_chunked"):
        options = nn.LinearCrossEntropyOptions() if method == "linear_ce_chunked" else None

        def step(h, W, y):
            return F.linear_cross_entropy(h, W, y, options=options)

    elif method == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def step(h, W, y):
            return liger(W, h, y)

    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        def step(h, W, y):
            return linear_cross_entropy(h, W, y)

    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_step(method: str, loss: str, m: int, D: int, d: int, device: torch.device):
    """One forward + backward of the loss alone, as a closure over its tensors."""
    step = build_step(method, loss)
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(m, d, device=device, generator=gen).requires_grad_()
    W = (torch.randn(D, d, device=device, generator=gen) / d**0.5).requires_grad_()
    y = torch.randint(D, (m,), device=device, generator=gen)

    def run() -> None:
        h.grad = W.grad = None
        step(h, W, y).backward()

    return run


class LanguageModel(nn.Module):
    """Embedding and a one-layer LSTM of width d: the body under each output layer."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.embed(x))[0]


def lm_step(method: str, tokens: int, D: int, d: int, device: torch.device, bptt: int = 128):
    """One AdamW training step of a whole language model of ``tokens`` tokens per step."""
    torch.manual_seed(0)
    model = LanguageModel(D, d).to(device)
    if method == "linear_taylor":
        head: nn.Module = sl.LinearSphericalLoss(d, D, "taylor", device=device)
    elif method == "adaptive":
        cutoffs = [c for c in (2_000, 10_000, 50_000) if c < D] or [D // 2]
        head = nn.AdaptiveLogSoftmaxWithLoss(d, D, cutoffs, div_value=4.0).to(device)
    elif method in ("log_softmax", "linear_ce"):
        head = nn.Linear(d, D, bias=False, device=device)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(LM_METHODS)}")
    options = nn.LinearCrossEntropyOptions() if method == "linear_ce" else None
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-3)
    batch = max(1, tokens // bptt)
    # A synthetic Zipf stream (p_k ∝ 1/(k+1), as word frequencies): speed only.
    gen = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, D + 1, dtype=torch.float64)
    stream = torch.multinomial(zipf, 8 * batch * bptt + 1, replacement=True, generator=gen)
    stream = stream.to(device)
    count = [0]

    def run() -> None:
        at = (count[0] % 8) * batch * bptt
        count[0] += 1
        x = stream[at : at + batch * bptt].view(batch, bptt)
        y = stream[at + 1 : at + 1 + batch * bptt].view(batch, bptt)
        h = model(x)
        if method == "linear_taylor":
            loss = head(h, y)
        elif method == "adaptive":
            loss = head(h.reshape(-1, d), y.reshape(-1)).loss
        elif method == "log_softmax":
            loss = F.cross_entropy(head(h).view(-1, D), y.reshape(-1))
        else:
            loss = F.linear_cross_entropy(
                h.reshape(-1, d), head.weight, y.reshape(-1), options=options
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def measure(args: argparse.Namespace, method: str, m: int, D: int, d: int) -> dict:
    """One method at one size: ``{"median_s", "peak_mb"}``."""
    device = torch.device(args.device)
    if args.lm:

        def make(m, D, d):
            return lm_step(method, m, D, d, device, bptt=min(128, m))

    else:

        def make(m, D, d):
            return loss_step(method, args.loss, m, D, d, device)

    # The baseline includes what the method needs at any size (code paths, thread pools).
    make(8, 16, 4)()
    synchronize(device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = make(m, D, d)
    times = []
    for i in range(args.repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"median_s": statistics.median(times), "peak_mb": peak / 2**20}


def worker(args: argparse.Namespace) -> None:
    """One method at one size, in a subprocess; prints a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(measure(args, args.method, args.m, args.D, args.d)))


def run_in_process(args: argparse.Namespace, method: str, m: int, D: int, d: int) -> dict:
    """:func:`measure` here, its error (an out-of-memory one included) as the result."""
    try:
        return measure(args, method, m, D, d)
    except Exception as e:  # the cell's error, in the table; the next cell goes on
        lines = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def run_one(args: argparse.Namespace, method: str, m: int, D: int, d: int) -> dict:
    command = [sys.executable, __file__, "--worker", method, "--m", str(m), "--D", str(D)]
    command += ["--d", str(d), "--repeats", str(args.repeats), "--loss", args.loss]
    command += ["--device", args.device, "--threads", str(args.threads)]
    command += ["--lm"] if args.lm else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"error": last[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="m:D:d,... (default: the full grid of the issue)")
    parser.add_argument("--lm", action="store_true", help="a whole language model, AdamW")
    parser.add_argument("--m", type=int, default=0)
    parser.add_argument("--D", type=int, default=0)
    parser.add_argument("--d", type=int, default=0)
    parser.add_argument(
        "--methods", help=f"from {', '.join(METHODS)} (with --lm: {', '.join(LM_METHODS)})"
    )
    parser.add_argument("--loss", default="taylor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    parser.add_argument(
        "--memory-gb",
        type=float,
        help="skip cells estimated above this (default: 80%% of this machine's memory, "
        "or on a GPU 72%% of its memory: 100 GiB of an H200)",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        help="each cell in its own subprocess (default: on the CPU yes, on a GPU no)",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.method = args.worker
        worker(args)
        return
    began = time.perf_counter()
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit(
            f"bench_linear.py: --device {args.device}, but no CUDA device is available here "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False)"
        )
    if args.memory_gb is None:
        if cuda:
            total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
            args.memory_gb = 0.72 * total / 2**30
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            args.memory_gb = 0.8 * total / 2**30
    isolate = not cuda if args.isolate is None else args.isolate

    if args.sizes:
        sizes = parse_sizes(args.sizes)
    elif args.lm:
        sizes = [(LM_TOKENS, D, LM_d) for D in LM_D]
    else:
        sizes = [(m, D, d) for D, d, m in itertools.product(FULL_D, FULL_d, FULL_M)]
    known = LM_METHODS if args.lm else METHODS
    default = LM_METHODS if args.lm else GPU_METHODS if cuda else DEFAULT_METHODS
    methods = (args.methods or ",".join(default)).split(",")
    for method in methods:
        if method not in known:
            parser.error(f"unknown method {method!r}; expected one of {', '.join(known)}")
    base_method = "linear_taylor" if args.lm else "linear"
    estimate = lm_estimated_bytes if args.lm else estimated_bytes
    lines = [
        "| m | D | d | method | step (s) | tokens/s | peak (MiB) | × linear | ideal | of ideal |",
        "|--:|--:|--:|:--|--:|--:|--:|--:|--:|--:|",
    ]
    skipped = []
    missing = {}
    for method in methods:
        why = unavailable(method, args.device)
        if why:
            missing[method] = why
    methods_run = [method for method in methods if method not in missing]
    for m, D, d in sizes:
        results = {}
        for method in methods_run:
            need = estimate(method, m, D, d) / 2**30
            if need > args.memory_gb:
                skipped.append(f"{method} at m={m}, D={D}, d={d} (about {need:.0f} GiB)")
                results[method] = {"error": f"skipped: about {need:.0f} GiB"}
            elif isolate:
                results[method] = run_one(args, method, m, D, d)
            else:
                results[method] = run_in_process(args, method, m, D, d)
            print(m, D, d, method, results[method], flush=True)
        base = results.get(base_method, {}).get("median_s")
        ideal = arithmetic_cost("dense", m, D, d) / arithmetic_cost("gram", m, D, d)
        for method in methods_run:
            lines.append(table_row(m, D, d, method, results[method], base, ideal, args.lm))

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    if args.lm:
        what = "a whole language model (embedding, LSTM, output layer), AdamW, one step"
        title = "# Linear path in a language model: tokens per second, AdamW"
    else:
        what = "forward + backward (to h and W)"
        title = "# Linear path: forward + backward against the dense member and linear CE"
    header = [
        title,
        "",
        f"- command: `{command}`",
        f"- machine: {machine(torch.device(args.device))}; torch {torch.__version__}; float32",
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- step: median of {args.repeats} steps of {what}, after one warm-up; m rows per step",
        f"- × linear: the method's step time over {base_method}'s; ideal: the arithmetic",
        "  model's dense/Gram ratio for the output layer, 3mDd / (2Dd² + 2md²); of ideal:",
        "  measured / ideal",
        "",
    ]
    footer = ["", "Not run (library missing):", ""] if missing else []
    footer += [f"- {method}: {why}" for method, why in missing.items()]
    limit = f"{args.memory_gb:.0f} GiB"
    footer += ["", f"Skipped (estimated memory above {limit}):", ""] if skipped else []
    footer += [f"- {s}" for s in skipped]
    footer += ["", f"Elapsed: {time.perf_counter() - began:.0f} s"]
    text = "\n".join(header + lines + footer) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def table_row(
    m: int, D: int, d: int, method: str, r: dict, base: float | None, ideal: float, lm: bool
) -> str:
    if "error" in r:
        return f"| {m} | {D} | {d} | {method} | {r['error']} | | | | | |"
    ratio = r["median_s"] / base if base else None
    cells = [f"{r['median_s']:.4g}", f"{m / r['median_s']:.4g}", f"{r['peak_mb']:.0f}"]
    cells.append(f"{ratio:.3g}" if ratio is not None else "")
    if method == ("log_softmax" if lm else "dense") and ratio is not None:
        cells += [f"{ideal:.3g}", f"{ratio / ideal:.2f}"]
    else:
        cells += ["", ""]
    return f"| {m} | {D} | {d} | {method} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
