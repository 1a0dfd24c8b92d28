"""One training loop for every task and every loss.

:func:`train` reads top to bottom: claim the run folder (:mod:`.runs`), build the network, its
output head (:mod:`.heads`) and optimizers, restore a checkpoint, then the epochs. Data order,
augmentation and dropout are drawn from generators seeded by ``(seed, epoch)`` and from the
RNG state saved in the checkpoint, so a run killed and resumed on the CPU ends with the same
metrics as one never interrupted. Under ``torchrun`` every process takes its share of each
global batch and ``DistributedDataParallel`` averages the gradients.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import family
from ..factored import FactoredSGD, NonFiniteUpdateError
from .heads import HEADS, Net, OutputHead
from .options import OPTIMIZERS, Resolved, RunConfig, RunError
from .runs import RunFolder, run_dir, run_record
from .tasks import Settings, Task, make_task

__all__ = ["RunConfig", "RunError", "evaluate", "perplexity", "run_dir", "train"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean negative log-likelihood; ``inf`` where a diverged model's is beyond
    what a float holds (``math.exp`` would raise).
    """
    return math.inf if mean_nll > 709.0 else math.exp(mean_nll)


def train(
    config: RunConfig,
    task: Task | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one training run; returns the contents of ``final.json``.

    ``task``: the task's data already loaded (default: loaded from ``config``); ``on_epoch``:
    called with each finished epoch's metrics (``tune`` prunes a trial there by raising).
    """
    resolved = config.resolve()
    settings = resolved.settings
    rank, world = _distributed()
    run = RunFolder(run_dir(config), run_record(config, world))
    finished = run.claim(config.resume)
    if finished is not None:
        return finished
    device = _device(config.device)
    if task is None:
        task = load_task(config)
    parts = build(config, task, resolved, device, world)
    history: list[dict[str, Any]] = []
    if config.resume and run.checkpoint.exists():
        history = restore(run, parts, config, device)
    if rank == 0:
        run.write_config()

    quiet = config.quiet or rank != 0
    # A run whose training loss stopped being finite cannot recover: it ends there, and its
    # final.json says so (a resumed one too).
    diverged = next((r["epoch"] for r in history if not math.isfinite(r["train_loss"])), None)
    for epoch in range(len(history) if diverged is None else settings.epochs, settings.epochs):
        row = train_epoch(config, task, settings, parts, epoch, rank, world, quiet)
        if rank == 0:
            for split in task.splits():
                row.update(evaluate(task, parts.net, parts.head, settings, split, device))
        history.append(row)
        if rank == 0:
            # The metrics first: a checkpoint always has its epoch's row beside it (a kill in
            # between leaves a row that a resume writes again from the checkpoint's history).
            run.write_metrics(history)
            run.save_checkpoint(checkpoint_state(config, parts, history))
            if not quiet:
                shown = {k: round(v, 4) for k, v in row.items() if k.startswith(("valid", "test"))}
                print(f"epoch {epoch + 1}/{settings.epochs} {shown}", flush=True)
        if world > 1:  # every process waits for the first one's evaluation and checkpoint
            dist.barrier()
        if not math.isfinite(row["train_loss"]):  # (the same on every process: all-reduced)
            diverged = epoch + 1
            if rank == 0:
                print(
                    f"{config.task} {config.loss_spec()}: training diverged (the training loss "
                    f"is not finite) in epoch {diverged}; stopping the run there",
                    file=sys.stderr,
                    flush=True,
                )
            break
        if on_epoch is not None:
            on_epoch(row)

    final = final_record(config, resolved, history, diverged, world)
    if rank == 0:
        run.write_final(final)
    return final


# -------------------------------------------------------------------------------- the parts


@dataclass
class Parts:
    """What trains: the network (``model``: the same, under DDP when distributed), its output
    head, the optimizers (the network's first) and their learning-rate schedules."""

    net: Net
    model: nn.Module
    head: OutputHead
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # (a CPU-only build asserts)
        raise RunError(f"--device {name}: not available here ({error})") from None
    return device


def load_task(config: RunConfig) -> Task:
    from .data import resolve_data_dir

    return make_task(config.task, resolve_data_dir(config.data_dir), config.vocab_size)


def build(
    config: RunConfig, task: Task, resolved: Resolved, device: torch.device, world: int = 1
) -> Parts:
    """The network, its head and optimizers, from the seed: the body, then the output
    layer's dense initialization (so that every head starts from one weight)."""
    settings = resolved.settings
    dtype = _DTYPES[config.dtype]
    head = HEADS[config.output](family.get_member(config.loss, **resolved.loss_options))
    torch.manual_seed(config.seed)
    body = task.build_body(settings)
    linear = nn.Linear(body.features, task.num_classes)
    layer = head.attach(linear, device, dtype)
    net = Net(body, layer, task.recurrent, head.applied).to(device, dtype)
    optimizers: list[torch.optim.Optimizer] = [
        OPTIMIZERS[config.optimizer].build(net.parameters(), settings)
    ]
    head_lr = settings.lr if config.head_lr is None else config.head_lr
    optimizers += head.optimizers(settings, head_lr, dist.group.WORLD if world > 1 else None)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, settings.lr_factor) for o in optimizers]
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    return Parts(net, model, head, optimizers, schedulers)


# ---------------------------------------------------------------------- checkpoint and resume


def checkpoint_state(
    config: RunConfig, parts: Parts, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """Plain data only (tensors, numbers, strings, lists, dicts): ``weights_only`` reads it."""
    return {
        "config": config.record(),
        "epoch": len(history),
        "net": parts.net.state_dict(),
        "head": parts.head.state_dict(),
        "opts": [o.state_dict() for o in parts.optimizers],
        "scheds": [s.state_dict() for s in parts.schedulers],
        "rng": torch.get_rng_state(),
        "history": history,
    }


def restore(
    run: RunFolder, parts: Parts, config: RunConfig, device: torch.device
) -> list[dict[str, Any]]:
    """Loads the checkpoint into ``parts`` and the RNG; returns the epochs' history."""
    ckpt = run.load_checkpoint(device)
    if ckpt["config"]["task"] != config.task or ckpt["config"]["loss"] != config.loss:
        raise RunError(f"{run.checkpoint} belongs to another run ({ckpt['config']})")
    parts.net.load_state_dict(ckpt["net"])
    parts.head.load_state_dict(ckpt["head"])
    for o, state in zip(parts.optimizers, ckpt["opts"], strict=True):
        o.load_state_dict(state)
    for s, state in zip(parts.schedulers, ckpt["scheds"], strict=True):
        s.load_state_dict(state)
    torch.set_rng_state(ckpt["rng"])
    return ckpt["history"]


# -------------------------------------------------------------------------------- one epoch


def _progress(iterable: Iterable, total: int | None, desc: str, quiet: bool) -> Any:
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_epoch(
    config: RunConfig,
    task: Task,
    settings: Settings,
    parts: Parts,
    epoch: int,
    rank: int,
    world: int,
    quiet: bool,
) -> dict[str, Any]:
    """One pass over the training set; the epoch's row of ``metrics.csv`` (no evaluation)."""
    device = next(parts.net.parameters()).device
    dtype = next(parts.net.parameters()).dtype
    t0 = time.perf_counter()
    total, count, seen = 0.0, 0, 0
    state = None
    batches = task.train_batches(settings, epoch, config.seed, rank, world)
    bar = _progress(batches, None, f"{config.task} {config.loss_spec()} e{epoch + 1}", quiet)
    for inputs, targets in bar:
        inputs = inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
        y = targets.reshape(-1).to(device)
        if task.recurrent and state is not None:
            state = tuple(s.detach() for s in state)
        out, state = parts.model(inputs, state)
        loss = parts.head.loss(out, y)
        for o in parts.optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if settings.clip:
            nn.utils.clip_grad_norm_(parts.net.parameters(), settings.clip)
        try:
            for o in parts.optimizers:
                o.step()
        except NonFiniteUpdateError:
            # The factored head refuses a non-finite update (on every process at once,
            # after its exchange): the run has diverged, which the epoch's loss now says.
            total, count = math.nan, count + 1
            break
        total += float(loss.detach())
        count += 1
        seen += len(y) * world
        if not quiet and count % 20 == 0:
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total / count:.4f}", per_s=f"{rate:,.0f}")
    try:  # a sync-free factored step (on a GPU) checks its updates later: at the latest here
        for o in parts.optimizers:
            if isinstance(o, FactoredSGD):
                o.check()
    except NonFiniteUpdateError:
        total = math.nan
    if count == 0:
        raise RunError("the training set is smaller than one batch")
    if world > 1:  # the epoch's loss over every process's batches (nan if any diverged)
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    train_seconds = time.perf_counter() - t0
    lr = parts.optimizers[0].param_groups[0]["lr"]
    for s in parts.schedulers:
        s.step()
    return {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": total / count,
        "train_seconds": round(train_seconds, 2),
        "train_per_second": round(seen / train_seconds, 1),
    }


@torch.no_grad()
def evaluate(
    task: Task,
    net: nn.Module,
    head: OutputHead,
    settings: Settings,
    split: str,
    device: torch.device,
) -> dict[str, float]:
    """Mean loss, error (%) at each of the task's top-k, and perplexity where the member
    defines probabilities (the model's own: Taylor, spherical, or softmax)."""
    was_training = net.training
    net.eval()
    n = 0
    loss_sum = 0.0
    logp_sum: float | None = 0.0
    hits = dict.fromkeys(task.topk, 0)
    state = None
    dtype = next(net.parameters()).dtype
    for inputs, targets in task.eval_batches(settings, split):
        inputs = inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
        y = targets.reshape(-1).to(device)
        out, state = net(inputs, state)
        loss_sum += float(head.loss(out, y, reduction="sum"))
        logp = head.log_prob(out, y)
        if logp is None or logp_sum is None:
            logp_sum = None
        else:
            logp_sum += float(logp.double().sum())
        top = head.topk(out, max(task.topk))
        for k in task.topk:
            hits[k] += int((top[:, :k] == y[:, None]).any(dim=1).sum())
        n += len(y)
    net.train(was_training)
    metrics = {f"{split}_loss": loss_sum / n}
    for k in task.topk:
        name = f"{split}_error" if k == 1 else f"{split}_top{k}_error"
        metrics[name] = 100.0 * (1.0 - hits[k] / n)
    if task.recurrent and logp_sum is not None:
        metrics[f"{split}_perplexity"] = perplexity(-logp_sum / n)
    return metrics


def final_record(
    config: RunConfig,
    resolved: Resolved,
    history: list[dict[str, Any]],
    diverged: int | None,
    world: int,
) -> dict[str, Any]:
    """What ``final.json`` holds."""
    return {
        "task": config.task,
        "loss": config.loss,
        "loss_options": config.loss_options,
        "loss_spec": config.loss_spec(),
        "resolved_loss_options": resolved.loss_options,
        "lr": resolved.settings.lr,
        "tuned": any(v.startswith("tuned") for v in resolved.sources.values()),
        "output": config.output,
        "optimizer": config.optimizer,
        "seed": config.seed,
        "profile": config.profile,
        "epochs": resolved.settings.epochs,
        "world_size": world,
        "epochs_run": len(history),
        "diverged_at_epoch": diverged,
        "train_seconds": round(sum(r["train_seconds"] for r in history), 1),
        "metrics": {k: v for k, v in history[-1].items() if k.startswith(("valid", "test"))},
    }
