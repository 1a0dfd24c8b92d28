"""The factored layer trained by two processes (gloo) against one process with the same batch."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spherical_losses import FactoredSGD, FactoredSphericalLoss, factored
from spherical_losses.experiments.cli import _close_process_group

D, IN, STEPS, LR, DECAY = 40, 6, 25, 0.3, 0.01


def batches(total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The global minibatches: the same on every process. Few classes, so targets repeat
    within a minibatch and across the processes' shares."""
    gen = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(total, IN, generator=gen, dtype=torch.float64),
            torch.randint(0, D // 4, (total,), generator=gen),
        )
        for _ in range(STEPS)
    ]


def make_layer(member: str, reduction: str, seed: int) -> FactoredSphericalLoss:
    torch.manual_seed(seed)
    return FactoredSphericalLoss(IN, D, member, reduction=reduction, dtype=torch.float64)


def train(
    layer: FactoredSphericalLoss, opt: FactoredSGD, shares: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    for h, target in shares:
        opt.zero_grad()
        layer(h, target).backward()
        opt.step()


def _worker(
    rank: int, init_file: str, member: str, reduction: str, split: int, out: str, int_targets: bool
) -> None:
    torch.set_num_threads(1)
    if int_targets:  # as if the classes outnumbered the integers that V's dtype holds exactly
        factored.optim._targets_fit = lambda num_classes, dtype: False
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # Another initial weight on rank 1: the optimizer's broadcast must replace it.
        layer = make_layer(member, reduction, seed=rank)
        opt = FactoredSGD(layer, lr=LR, weight_decay=DECAY, process_group=dist.group.WORLD)
        rows = slice(0, split) if rank == 0 else slice(split, None)
        train(layer, opt, [(h[rows], t[rows]) for h, t in batches(13 if split != 8 else 16)])
        torch.save(
            {"weight": layer.weight, "bias": layer.bias, "bytes": opt.last_exchange_bytes},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        _close_process_group()  # destroy_process_group alone can abort this process at exit


@pytest.mark.parametrize(
    ("member", "reduction", "split", "int_targets"),
    [
        # equal shares of 16: the mean of the means is the global mean
        ("taylor", "mean", 8, False),
        ("z_loss", "mean", 8, False),
        ("spherical", "sum", 5, False),  # shares of 5 and 8 rows
        ("taylor", "mean", 8, True),  # targets in their own integer tensor
    ],
)
def test_two_processes_match_one_process(
    member: str, reduction: str, split: int, int_targets: bool, tmp_path: Path
) -> None:
    mp.spawn(
        _worker,
        args=(str(tmp_path / "init"), member, reduction, split, str(tmp_path), int_targets),
        nprocs=2,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # One process, the whole minibatch; DistributedDataParallel averages the processes'
    # gradients, so with 'sum' the two processes take half the one-process step.
    layer = make_layer(member, reduction, seed=0)
    lr = LR if reduction == "mean" else LR / 2
    opt = FactoredSGD(layer, lr=lr, weight_decay=DECAY if reduction == "mean" else 2 * DECAY)
    train(layer, opt, batches(16 if split == 8 else 13))
    assert not torch.equal(layer.weight, make_layer(member, reduction, seed=0).weight)
    for result in results:
        torch.testing.assert_close(result["weight"], layer.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(result["bias"], layer.bias, rtol=1e-10, atol=1e-12)
    # Each process sends a header (its row count, lr, weight decay and an error flag), then
    # its rows padded to the largest share: m (3d + 5) float64 numbers with d = in_features + 1
    # (the bias), targets included.
    largest = max(split, (16 if split == 8 else 13) - split)
    numbers = 3 * (IN + 1) + (4 if int_targets else 5)
    expected = 4 * 8 + largest * numbers * 8 + (8 * largest if int_targets else 0)
    assert results[0]["bytes"] == expected
    assert results[0]["bytes"] < D * (IN + 1) * 8  # already less than one dense gradient


def _misuse_worker(rank: int, init_file: str, case: str, out: str) -> None:
    torch.set_num_threads(1)
    # A short timeout: were a process left waiting in the exchange, the test fails, not hangs.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        layer = make_layer("taylor", "mean", seed=0)
        lr = LR * (1 + rank) if case == "lr" else LR
        opt = FactoredSGD(layer, lr=lr, process_group=dist.group.WORLD)
        h, target = batches(4)[0]
        try:
            layer(h, target).backward()
            opt.step()  # (where the learning rates differ, this step raises)
            if not (case == "step again" and rank == 1):  # no zero_grad, no backward there
                opt.zero_grad()
                layer(h, target).backward()
            opt.step()
        except (RuntimeError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
        else:
            error = "no error"
        Path(out, f"rank{rank}.txt").write_text(error)
    finally:
        _close_process_group()


@pytest.mark.parametrize("case", ["lr", "step again"])
def test_a_misuse_on_one_process_raises_on_every_process(case: str, tmp_path: Path) -> None:
    # Each process would otherwise apply another step (different learning rates), or wait in
    # the exchange for the one that raised, until the group's timeout.
    mp.spawn(
        _misuse_worker, args=(str(tmp_path / "init"), case, str(tmp_path)), nprocs=2, join=True
    )
    errors = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    if case == "lr":
        for error in errors:
            assert error.startswith("ValueError: FactoredSGD: the processes of the group have")
            assert f"({LR!r}, 0.0), ({2 * LR!r}, 0.0)" in error
    else:
        assert errors[1].startswith("RuntimeError: FactoredSGD.step() called again")
        assert errors[0].startswith("RuntimeError: FactoredSGD.step() failed on process 1")


def test_single_process_group(tmp_path: Path) -> None:
    # A group of one: the exchange is the identity, and the run is that of no group.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        a = make_layer("taylor", "mean", seed=0)
        b = make_layer("taylor", "mean", seed=0)
        train(a, FactoredSGD(a, lr=LR, process_group=dist.group.WORLD), batches(7))
        train(b, FactoredSGD(b, lr=LR), batches(7))
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-12, atol=0.0)
    finally:
        _close_process_group()


def test_process_group_must_be_a_process_group() -> None:
    # e.g. the group's name, or a rank, where the group object belongs
    layer = make_layer("taylor", "mean", seed=0)
    for wrong, name in (("WORLD", "str"), (0, "int")):
        message = rf"process_group must be a torch\.distributed ProcessGroup or None, got {name}"
        with pytest.raises(ValueError, match=message):
            FactoredSGD(layer, lr=LR, process_group=wrong)
