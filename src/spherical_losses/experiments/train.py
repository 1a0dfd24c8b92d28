"""One training loop for every task and every loss.

A run lives in its own directory::

    <out>/<task>/<loss>[-factored]/seed-<N>/
        config.json      what was asked for, with the resolved settings
        metrics.csv      one row per finished epoch
        checkpoint.pt    written atomically after every epoch (``--resume`` continues from it)
        final.json       written last, atomically: the run is finished when it exists

Data order, augmentation and dropout are drawn from generators seeded by ``(seed, epoch)`` and
from the RNG state saved in the checkpoint, so a run killed and resumed on the CPU ends with
the same metrics as one never interrupted. Under ``torchrun`` every process takes its share
of each global batch and ``DistributedDataParallel`` averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import family, functional
from ..factored import NonFiniteUpdateError
from .tasks import PROFILES, Settings, Task, make_task, model_options

__all__ = ["RunConfig", "RunError", "evaluate", "run_dir", "train"]


class RunError(ValueError):
    """A run cannot start or continue (bad configuration, existing directory, ...)."""


@dataclass
class RunConfig:
    """What one run is: the task, the loss, the seed, and overrides of the profile."""

    task: str
    loss: str
    loss_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    profile: str = "cpu"
    output: str = "dense"  # or 'factored' (FactoredSphericalLoss + FactoredSGD)
    out: str = "runs"
    data_dir: str | None = None
    device: str = "cpu"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None  # the factored output layer's learning rate (default: lr)
    clip: float | None = None
    train_limit: int | None = None
    vocab_size: int | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    quiet: bool = False
    resume: bool = False

    def settings(self) -> Settings:
        if self.profile not in PROFILES:
            raise RunError(
                f"unknown profile {self.profile!r}; expected one of {', '.join(PROFILES)}"
            )
        profile = PROFILES[self.profile]
        base = profile.get(self.task, profile["ptb"] if self.task == "text" else None)
        if base is None:
            raise RunError(f"unknown task {self.task!r}")
        changes = {
            k: v
            for k, v in (
                ("epochs", self.epochs),
                ("batch_size", self.batch_size),
                ("lr", self.lr),
                ("clip", self.clip),
                ("train_limit", self.train_limit),
            )
            if v is not None
        }
        for key in ("epochs", "batch_size", "train_limit"):
            if key in changes and changes[key] < 1:
                raise RunError(f"--{key.replace('_', '-')} must be >= 1, got {changes[key]}")
        if "lr" in changes and not changes["lr"] > 0:
            raise RunError(f"--lr must be > 0, got {changes['lr']}")
        if self.head_lr is not None and not self.head_lr > 0:
            raise RunError(f"--head-lr must be > 0, got {self.head_lr}")
        if "clip" in changes and not changes["clip"] >= 0:  # (a negative one flips the step)
            raise RunError(f"--clip must be >= 0 (0: no clipping), got {changes['clip']}")
        if self.model_options:
            allowed = model_options(self.task)
            bad = sorted(set(self.model_options) - set(allowed))
            if bad:
                raise RunError(
                    f"unknown model option(s) {', '.join(bad)} for task {self.task!r}; "
                    f"expected {', '.join(allowed)}"
                )
            for key, value in self.model_options.items():
                if not isinstance(value, int | float):
                    raise RunError(f"model option {key} must be a number, got {value!r}")
            changes["model"] = {**base.model, **self.model_options}
        return base.replace(**changes)

    def loss_spec(self) -> str:
        """``name`` or ``name(key=value,...)``: how tables name the loss."""
        if not self.loss_options:
            return self.loss
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.loss_options.items()))
        return f"{self.loss}({opts})"


# What makes a run the run it is: a run directory's config.json must agree on these before
# --resume continues it or `compare` counts it as done (out, data_dir, device, quiet may differ).
_IDENTITY = (
    "task",
    "loss",
    "loss_options",
    "seed",
    "profile",
    "output",
    "head_lr",
    "vocab_size",
    "dtype",
    "settings",
    "world_size",
)


def run_record(config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """What ``config.json`` holds: the configuration, its resolved settings, the processes."""
    return {**asdict(config), "settings": asdict(config.settings()), "world_size": world_size}


def check_same_run(folder: Path, record: dict[str, Any]) -> None:
    """Raises :class:`RunError` when ``folder`` holds a run (finished or interrupted) made
    with other settings.
    """
    path = folder / "config.json"
    if not path.exists() or not any((folder / f).exists() for f in ("final.json", "checkpoint.pt")):
        return
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path} ({error}); move the run directory away") from None
    now = json.loads(json.dumps(record))  # (as JSON has it: lists for tuples, ...)
    differences = []
    for key in _IDENTITY:
        old, new = saved.get(key), now.get(key)
        if key == "settings" and isinstance(old, dict) and isinstance(new, dict):
            differences += [
                f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            differences.append(f"{key}: {old!r} there, {new!r} now")
    if differences:
        raise RunError(
            f"{folder} holds a run made with other settings ({'; '.join(differences)}); "
            "give the same settings to continue it, or another --out"
        )


def perplexity(mean_nll: float) -> float:
    """``exp`` of the mean negative log-likelihood; ``inf`` where a diverged model's is beyond
    what a float holds (``math.exp`` would raise).
    """
    return math.inf if mean_nll > 709.0 else math.exp(mean_nll)


def run_dir(config: RunConfig) -> Path:
    spec = config.loss_spec().replace("(", "_").replace(")", "").replace(",", "_")
    if config.output == "factored":
        spec += "-factored"
    return Path(config.out) / config.task / spec / f"seed-{config.seed}"


# --------------------------------------------------------------------------------------------
# output layers: dense (nn.Linear inside the network) or factored (owned by the loss)


class Net(nn.Module):
    """Body + optional dense output layer; returns logits (dense) or features (factored)."""

    def __init__(self, body: nn.Module, head: nn.Linear | None, recurrent: bool) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.recurrent = recurrent

    def forward(self, x: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        if self.recurrent:
            feats, state = self.body(x, state)
        else:
            feats = self.body(x)
        feats = feats.reshape(-1, feats.shape[-1])
        return (feats if self.head is None else self.head(feats)), state


class DenseOutput:
    """Scores from logits: the member's dense loss, probabilities and top-k."""

    def __init__(self, member: family.Member) -> None:
        self.member = member

    def loss(self, logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return functional.spherical_loss(logits, target, self.member, reduction=reduction)

    def log_prob(self, logits: Tensor, target: Tensor) -> Tensor | None:
        member = self.member
        if member.spherical and member.has_probabilities:
            s, q, oc = family.statistics(logits, target)
            return member.target_log_prob(s, q, oc, logits.shape[-1])
        try:
            logp = member.log_probs(logits, dim=-1)
        except ValueError:  # the member defines no probabilities (Z-loss, squared error)
            return None
        return logp.gather(-1, target[:, None])[:, 0]

    def topk(self, logits: Tensor, k: int) -> Tensor:
        return _ranking_scores(self.member, logits).topk(k, dim=-1).indices


def _ranking_scores(member: family.Member, logits: Tensor) -> Tensor:
    """What a prediction ranks classes by: the member's own probabilities where it defines
    them (Taylor's 1 + o + o²/2 and spherical's o² + ε are not increasing in o, so the largest
    logit need not be the most probable class), else the logits."""
    if member.has_probabilities:
        return member.log_probs(logits, dim=-1)
    return logits


class FactoredOutput:
    """Scores from features through :class:`~spherical_losses.FactoredSphericalLoss`."""

    def __init__(self, crit: nn.Module) -> None:
        self.crit = crit
        self.member = crit.member

    def loss(self, feats: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        if reduction not in ("mean", "sum") or self.crit.reduction != "mean":
            raise ValueError(f"unsupported reduction {reduction!r} for the factored output")
        loss = self.crit(feats, target)
        return loss * len(target) if reduction == "sum" else loss

    def log_prob(self, feats: Tensor, target: Tensor) -> Tensor | None:
        if not self.member.has_probabilities:
            return None
        return self.crit.log_prob(feats, target)

    def topk(self, feats: Tensor, k: int) -> Tensor:
        # In chunks of classes (O(D·d) time, bounded memory); by the member's probabilities
        # where it defines them, as the dense output ranks.
        by = "probability" if self.member.has_probabilities else "logit"
        return self.crit.topk(feats, k, by=by)[1]


# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    task: Task, net: nn.Module, output: Any, settings: Settings, split: str, device: torch.device
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
        loss_sum += float(output.loss(out, y, reduction="sum"))
        logp = output.log_prob(out, y)
        if logp is None or logp_sum is None:
            logp_sum = None
        else:
            logp_sum += float(logp.double().sum())
        top = output.topk(out, max(task.topk))
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


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)]
    lines += [",".join(_fmt(row.get(k, "")) for k in keys) for row in rows]
    _write_text(path, "\n".join(lines) + "\n")


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _progress(iterable: Iterable, total: int | None, desc: str, quiet: bool) -> Any:
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _build(
    config: RunConfig,
    task: Task,
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    world: int = 1,
) -> tuple[Net, Any, list[torch.optim.Optimizer]]:
    torch.manual_seed(config.seed)
    body = task.build_body(settings)
    member = family.get_member(config.loss, **config.loss_options)
    params = dict(momentum=settings.momentum, weight_decay=settings.weight_decay)
    if config.output == "dense":
        head = nn.Linear(body.features, task.num_classes)
        net = Net(body, head, task.recurrent).to(device, dtype)
        return net, DenseOutput(member), [torch.optim.SGD(net.parameters(), settings.lr, **params)]
    if config.output != "factored":
        raise RunError(f"--output must be 'dense' or 'factored', got {config.output!r}")
    from ..factored import FactoredSGD, FactoredSphericalLoss

    if not member.spherical:
        raise RunError(
            f"--output factored needs a spherical loss; {config.loss_spec()} is not spherical "
            "(it does not depend on the outputs through (s, q, o_c) only)"
        )
    if settings.momentum:
        raise RunError(
            f"--output factored trains the output layer with plain SGD (momentum has no exact "
            f"O(d²) form), but the {config.profile} profile of {config.task!r} uses momentum "
            f"{settings.momentum}; use --output dense for this task"
        )
    # The dense head's initialization, so that dense and factored runs start from one weight.
    head = nn.Linear(body.features, task.num_classes)
    net = Net(body, None, task.recurrent).to(device, dtype)
    crit = FactoredSphericalLoss.from_linear(head, loss=member).to(device, dtype)
    opts: list[torch.optim.Optimizer] = [torch.optim.SGD(net.parameters(), settings.lr, **params)]
    # Under torchrun the processes exchange their rows of each update (O(m d) numbers), not a
    # D × d gradient, and apply the same exact step.
    group = dist.group.WORLD if world > 1 else None
    opts.append(
        FactoredSGD(
            crit,
            settings.lr if config.head_lr is None else config.head_lr,
            weight_decay=settings.weight_decay,
            process_group=group,
        )
    )
    return net, FactoredOutput(crit), opts


def train(config: RunConfig, task: Task | None = None) -> dict[str, Any]:
    """Runs (or resumes) one training run; returns the contents of ``final.json``."""
    settings = config.settings()
    rank, world = _distributed()
    folder = run_dir(config)
    final_path = folder / "final.json"
    ckpt_path = folder / "checkpoint.pt"
    record = run_record(config, world)
    if final_path.exists():
        if not config.resume:
            raise RunError(
                f"{folder} holds a finished run; use --resume to keep it, or another --out"
            )
        check_same_run(folder, record)
        return json.loads(final_path.read_text())
    if ckpt_path.exists() and not config.resume:
        raise RunError(f"{folder} holds an interrupted run; use --resume to continue it")
    if ckpt_path.exists():
        check_same_run(folder, record)

    try:
        device = torch.device(config.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:  # (a CPU-only build asserts)
        raise RunError(f"--device {config.device}: not available here ({error})") from None
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(config.dtype)
    if dtype is None:
        raise RunError(f"--dtype must be float32 or float64, got {config.dtype!r}")
    if task is None:
        from .data import resolve_data_dir

        task = make_task(config.task, resolve_data_dir(config.data_dir), config.vocab_size)
    net, output, opts = _build(config, task, settings, device, dtype, world)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, settings.lr_factor) for o in opts]
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )

    history: list[dict[str, Any]] = []
    start = 0
    if config.resume and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as error:  # (whatever a damaged file makes the unpickler raise)
            raise RunError(
                f"cannot read {ckpt_path} ({type(error).__name__}: {error}); delete it to start "
                "the run again"
            ) from None
        if ckpt["config"]["task"] != config.task or ckpt["config"]["loss"] != config.loss:
            raise RunError(f"{ckpt_path} belongs to another run ({ckpt['config']})")
        net.load_state_dict(ckpt["net"])
        if isinstance(output, FactoredOutput):
            output.crit.load_state_dict(ckpt["head"])
        for o, state in zip(opts, ckpt["opts"], strict=True):
            o.load_state_dict(state)
        for s, state in zip(scheds, ckpt["scheds"], strict=True):
            s.load_state_dict(state)
        torch.set_rng_state(ckpt["rng"])
        history, start = ckpt["history"], ckpt["epoch"]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _write_text(folder / "config.json", json.dumps(record, indent=2) + "\n")

    quiet = config.quiet or rank != 0
    # A run whose training loss stopped being finite cannot recover: it ends there, and its
    # final.json says so (a resumed one too).
    diverged = next((r["epoch"] for r in history if not math.isfinite(r["train_loss"])), None)
    for epoch in range(start if diverged is None else settings.epochs, settings.epochs):
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
            out, state = model(inputs, state)
            loss = output.loss(out, y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip:
                nn.utils.clip_grad_norm_(net.parameters(), settings.clip)
            try:
                for o in opts:
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
        if count == 0:
            raise RunError("the training set is smaller than one batch")
        if world > 1:  # the epoch's loss over every process's batches (nan if any diverged)
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total, count = sums[0].item(), int(sums[1].item())
        train_seconds = time.perf_counter() - t0
        lr = opts[0].param_groups[0]["lr"]
        for s in scheds:
            s.step()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": total / count,
            "train_seconds": round(train_seconds, 2),
            "train_per_second": round(seen / train_seconds, 1),
        }
        if rank == 0:
            for split in task.splits():
                row.update(evaluate(task, net, output, settings, split, device))
        history.append(row)
        if rank == 0:
            ckpt = {
                "config": asdict(config),
                "epoch": epoch + 1,
                "net": net.state_dict(),
                "head": output.crit.state_dict() if isinstance(output, FactoredOutput) else None,
                "opts": [o.state_dict() for o in opts],
                "scheds": [s.state_dict() for s in scheds],
                "rng": torch.get_rng_state(),
                "history": history,
            }
            _atomic_write(ckpt_path, lambda p, c=ckpt: torch.save(c, p))
            _write_csv(folder / "metrics.csv", history)
            if not quiet:
                shown = {k: round(v, 4) for k, v in row.items() if k.startswith(("valid", "test"))}
                print(f"epoch {epoch + 1}/{settings.epochs} {shown}", flush=True)
        if world > 1:  # every process waits for the first one's evaluation and checkpoint
            dist.barrier()
        if not math.isfinite(total):  # (the same on every process: total was all-reduced)
            diverged = epoch + 1
            if rank == 0:
                print(
                    f"{config.task} {config.loss_spec()}: training diverged (the training loss "
                    f"is not finite) in epoch {diverged}; stopping the run there",
                    file=sys.stderr,
                    flush=True,
                )
            break

    final = {
        "task": config.task,
        "loss": config.loss,
        "loss_options": config.loss_options,
        "loss_spec": config.loss_spec(),
        "output": config.output,
        "seed": config.seed,
        "profile": config.profile,
        "epochs": settings.epochs,
        "world_size": world,
        "epochs_run": len(history),
        "diverged_at_epoch": diverged,
        "train_seconds": round(sum(r["train_seconds"] for r in history), 1),
        "metrics": {k: v for k, v in history[-1].items() if k.startswith(("valid", "test"))},
    }
    if rank == 0:
        _write_text(final_path, json.dumps(final, indent=2) + "\n")
    return final
