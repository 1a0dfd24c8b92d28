"""How many PyTorch operations one forward + backward of each member dispatches, against
``F.cross_entropy``: at small C a call's time is mostly this count, not arithmetic.

Counts the ``aten::`` events that :mod:`torch.profiler` records for one call after a warm-up
(nested calls counted too: ``aten::to`` and the copy it makes are two).

    python benchmarks/count_ops.py                 # 4096 x 10
    python benchmarks/count_ops.py --size 256x1000
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import spherical_losses as sl


def count(fn, x: torch.Tensor, y: torch.Tensor) -> int:
    fn(x, y).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(x, y).backward()
    return sum(e.name.startswith("aten::") for e in prof.events())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4096x10", help="NxC")
    args = parser.parse_args()
    n, c = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    x = torch.randn(n, c, requires_grad=True)
    y = torch.randint(0, c, (n,))
    methods = {"cross_entropy": F.cross_entropy}
    for name in sl.member_names():
        methods[name] = lambda a, b, name=name: sl.spherical_loss(a, b, name)
    methods["softmax_bound(xi=1)"] = lambda a, b: sl.spherical_loss(
        a, b, sl.get_member("softmax_bound", xi=1.0)
    )
    print(f"| {n} × {c} | operations per forward + backward |\n|---|---|")
    for name, fn in methods.items():
        print(f"| {name} | {count(fn, x, y)} |")


if __name__ == "__main__":
    main()
