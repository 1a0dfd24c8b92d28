"""The linear path without logits under DistributedDataParallel (two gloo processes) against
one process and the dense loss on the whole minibatch, with AdamW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import spherical_losses as sl
from spherical_losses.experiments.cli import _close_process_group

D, IN, HIDDEN, BATCH, STEPS = 50, 7, 6, 16, 8


class Model(nn.Module):
    """A body and, as its output layer, a LinearSphericalLoss (or its weight, for dense)."""

    def __init__(self, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh())
        self.head = sl.LinearSphericalLoss(HIDDEN, D, loss="taylor", bias=True, dtype=torch.float64)
        self.method = method
        self.double()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.method == "dense":
            logits = F.linear(h, self.head.linear.weight, self.head.linear.bias)
            return sl.taylor_cross_entropy(logits, y)
        return sl.linear_spherical_loss(
            h, self.head.linear.weight, y, "taylor", linear_bias=self.head.linear.bias,
            method=self.method,
        )  # fmt: skip


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(BATCH, IN, generator=gen, dtype=torch.float64),
            torch.randint(0, D, (BATCH,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def train(model: nn.Module, shares: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    for x, y in shares:
        opt.zero_grad()
        model(x, y).backward()
        opt.step()


def _worker(rank: int, init_file: str, method: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = nn.parallel.DistributedDataParallel(Model(method))
        half = slice(0, BATCH // 2) if rank == 0 else slice(BATCH // 2, None)
        train(model, [(x[half], y[half]) for x, y in batches()])
        torch.save(model.module.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        _close_process_group()


@pytest.mark.parametrize("method", ["gram", "chunked"])
def test_ddp_matches_one_process_and_the_dense_loss(method: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), method, str(tmp_path)), nprocs=2, join=True)
    # Equal shares and 'mean': DDP's average of the two halves' gradients is the whole
    # minibatch's gradient, so both processes follow one process on the whole minibatch.
    dense = Model("dense")
    train(dense, batches())
    assert not torch.equal(dense.head.linear.weight, Model("dense").head.linear.weight)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in dense.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=1e-9, atol=1e-11, msg=name)
