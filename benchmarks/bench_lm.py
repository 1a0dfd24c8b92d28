"""Training speed of a whole LSTM language model with each kind of output layer.

Tokens per second of a full training step (embedding, 2-layer LSTM with d = 512, output layer
and loss, backward, SGD update) for:

* ``log_softmax``: ``nn.Linear`` + ``F.cross_entropy``;
* ``linear_cross_entropy``: PyTorch's chunked ``F.linear_cross_entropy``;
* ``adaptive``: ``nn.AdaptiveLogSoftmaxWithLoss`` (cutoffs 2,000 / 10,000 / 50,000 below D);
* ``taylor``: ``nn.Linear`` + the dense log-Taylor softmax;
* ``factored_taylor``: :class:`~spherical_losses.FactoredSphericalLoss` + ``FactoredSGD``;

at D = 10,000 (real Penn Treebank) and at 100,000 and 793,471 words (a **synthetic** Zipf
token stream: speed only, never a quality claim). Each method runs in a fresh process (so
that its peak resident memory is its own); every method uses plain SGD and a sparse embedding
gradient, so the only difference is the output layer. Ratios are against ``log_softmax`` at
the same size, measured in the same run.

    python benchmarks/bench_lm.py                       # the full table (about 15 minutes)
    python benchmarks/bench_lm.py --sizes 10000 --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import spherical_losses as sl
from spherical_losses.experiments import data
from spherical_losses.experiments.models import LSTMBody

METHODS = ["log_softmax", "linear_cross_entropy", "adaptive", "taylor", "factored_taylor"]
SIZES = [10_000, 100_000, 793_471]


def tokens(vocab: int, n: int) -> tuple[torch.Tensor, str]:
    """Real PTB at its own vocabulary (from ``SPHERICAL_LOSSES_DATA``), else synthetic."""
    root = data.resolve_data_dir(None)
    if vocab == 10_000 and (root / "ptb").exists():
        return data.load_ptb(root).train[:n], "PTB (real)"
    return data.zipf_token_stream(n, vocab, seed=0), "Zipf (synthetic)"


def build(method: str, vocab: int, d: int, lr: float):
    torch.manual_seed(0)
    body = LSTMBody(vocab, hidden=d, layers=2, dropout=0.0, sparse=True)
    params = list(body.parameters())
    factored = None
    if method == "adaptive":
        cutoffs = [c for c in (2_000, 10_000, 50_000) if c < vocab]
        head: nn.Module = nn.AdaptiveLogSoftmaxWithLoss(d, vocab, cutoffs, div_value=4.0)
    elif method == "factored_taylor":
        head = factored = sl.FactoredSphericalLoss(d, vocab, loss="taylor")
    else:
        head = nn.Linear(d, vocab)
    if factored is None:
        params += list(head.parameters())
    opts: list[torch.optim.Optimizer] = [torch.optim.SGD(params, lr)]
    if factored is not None:
        opts.append(sl.FactoredSGD(factored, lr))

    def loss_fn(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if method == "log_softmax":
            return F.cross_entropy(head(h), y)
        if method == "taylor":
            return sl.taylor_cross_entropy(head(h), y)
        if method == "linear_cross_entropy":
            return F.linear_cross_entropy(h, head.weight, y, linear_bias=head.bias)
        if method == "adaptive":
            return head(h, y).loss
        return head(h, y)

    return body, loss_fn, opts


def probe(method: str, vocab: int, d: int, batch: int, bptt: int, steps: int) -> dict:
    stream, source = tokens(vocab, (steps + 2) * batch * bptt + batch)
    columns = data.batchify(stream, batch)
    body, loss_fn, opts = build(method, vocab, d, lr=0.1)
    state = None
    times = []
    for i, (x, y) in enumerate(data.bptt_batches(columns, bptt)):
        if i == steps + 1:
            break
        start = time.perf_counter()
        for o in opts:
            o.zero_grad(set_to_none=True)
        if state is not None:
            state = tuple(s.detach() for s in state)
        h, state = body(x, state)
        loss = loss_fn(h.reshape(-1, d), y.reshape(-1))
        loss.backward()
        for o in opts:
            o.step()
        if i > 0:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    times.sort()
    step = times[len(times) // 2]
    return {
        "method": method,
        "vocab": vocab,
        "source": source,
        "step_s": step,
        "tokens_per_s": batch * bptt / step,
        "peak_gib": peak / 2**30,
        # The two D × d tensors of every method: the input embedding and the output weight
        # (V for the factored layer).
        "embedding_gib": body.embedding.weight.numel() * 4 / 2**30,
        "output_gib": vocab * (d + 1) * 4 / 2**30,
        "loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bptt", type=int, default=20)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (median)")
    p.add_argument("--out", default="benchmarks/results/lm_cpu.md")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        method, vocab = args.probe.split(":")
        result = probe(method, int(vocab), args.hidden, args.batch, args.bptt, args.steps)
        print(json.dumps(result))
        return
    lines = [
        f"Command: `python benchmarks/bench_lm.py --sizes {args.sizes} --steps {args.steps}`; "
        f"LSTM 2×{args.hidden}, batch {args.batch} × bptt {args.bptt} = "
        f"{args.batch * args.bptt} tokens per step, float32, {os.cpu_count()} cores, "
        f"torch {torch.__version__}",
        "",
        "| D | tokens | method | step (s) | tokens/s | × log_softmax | peak RSS (GiB) "
        "| embedding + output weight (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vocab in map(int, args.sizes.split(",")):
        results = {}
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--probe", f"{method}:{vocab}"]
            cmd += ["--hidden", str(args.hidden), "--batch", str(args.batch)]
            cmd += ["--bptt", str(args.bptt), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get("log_softmax", {}).get("tokens_per_s")
        for method, r in results.items():
            rel = f"{r['tokens_per_s'] / base:.1f}" if base else "—"
            lines.append(
                f"| {vocab:,} | {r['source']} | {method} | {r['step_s']:.3f} | "
                f"{r['tokens_per_s']:,.0f} | {rel} | {r['peak_gib']:.2f} | "
                f"{r['embedding_gib']:.3f} + {r['output_gib']:.3f} |"
            )
            print(lines[-1], flush=True)
    table = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table)
    print(f"\n{table}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
