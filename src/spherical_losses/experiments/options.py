"""The options of a run, each declared once.

:class:`RunConfig` is the one declaration: each field carries, in its metadata, its command-line
flag, its type, its help and its check. The parsers of ``train``, ``compare`` and ``tune``
(:func:`add_run_options`), the configuration built from a command line (:func:`config_from_args`),
the command line that ``compare`` hands each run (:func:`passthrough`) and the checks
(:meth:`RunConfig.settings`) are derived from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from .. import family
from .tasks import PROFILES, Settings, model_options, task_names

__all__ = [
    "OPTIMIZERS",
    "Optimizer",
    "RunConfig",
    "RunError",
    "add_run_options",
    "config_from_args",
    "parse_options",
    "passthrough",
]

RUN_COMMANDS = ("train", "compare", "tune")


class RunError(ValueError):
    """A run cannot start or continue (bad configuration, existing directory, ...)."""


def _option(
    default: Any = MISSING,
    *,
    help: str | None = None,
    type: Callable[[str], Any] | None = str,
    kind: str = "value",  # 'value', 'pairs' (repeatable KEY=VALUE) or 'switch'
    flag: str | None = None,
    choices: Callable[[], Sequence[str]] | None = None,
    commands: Sequence[str] = RUN_COMMANDS,
    bound: tuple[str, float, str] | None = None,  # (">=" or ">", limit, note)
    setting: bool = False,  # overrides the profile's value of the same name
) -> Any:
    metadata = dict(
        help=help, type=type, kind=kind, flag=flag, choices=choices, commands=tuple(commands),
        bound=bound, setting=setting,
    )  # fmt: skip
    if kind == "pairs":
        return field(default_factory=dict, metadata=metadata)
    return field(default=default, metadata=metadata)


def _heads() -> Sequence[str]:
    from .heads import HEADS

    return tuple(HEADS)


def _head(name: str) -> Any:
    from .heads import HEADS

    if name not in HEADS:
        raise RunError(f"--output must be one of {', '.join(map(repr, HEADS))}, got {name!r}")
    return HEADS[name]


@dataclass(frozen=True)
class Optimizer:
    """An ``--optimizer`` choice: what trains the network's parameters (the output layer's
    too, but for the factored head, which brings its own).

    ``replaces``: the profile's settings it does not use, with the values it runs with (the
    profiles' learning rates and momentum are SGD's).
    """

    build: Callable[[Any, Settings], torch.optim.Optimizer]  # (parameters, settings)
    replaces: dict[str, Any]


def _sgd(params: Any, settings: Settings) -> torch.optim.Optimizer:
    # weight decay as L2: weight_decay · w added to the gradient (scaled by lr, momentum)
    return torch.optim.SGD(
        params, settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )


def _adamw(params: Any, settings: Settings) -> torch.optim.Optimizer:
    # torch.optim.AdamW's decoupled weight decay: each step multiplies the weights by
    # 1 − lr · weight_decay, apart from the adaptive gradient step (betas (0.9, 0.999), eps
    # 1e-8). The setting's weight decay (0 in the language-model profiles), not AdamW's 0.01.
    return torch.optim.AdamW(params, settings.lr, weight_decay=settings.weight_decay)


#: The optimizers by ``--optimizer`` name; ``sgd`` (the default) is what every profile was
#: made for. AdamW starts from its usual learning rate 1e-3 (the profiles' are SGD's: 20 for
#: the LSTM) and has no momentum setting (its β₁ is 0.9).
OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(_sgd, {}),
    "adamw": Optimizer(_adamw, {"lr": 1e-3, "momentum": 0.0}),
}


def _optimizer(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise RunError(
            f"--optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}"
        )
    return OPTIMIZERS[name]


@dataclass
class RunConfig:
    """What one run is: the task, the loss, the seed, and overrides of the profile.

    ``None`` means "the profile's value" (or the tuned one, where a tune saved one).
    """

    task: str = _option(choices=task_names)
    loss: str = _option(
        commands=("train", "tune"), help=f"one of {', '.join(family.member_names())}"
    )
    loss_options: dict[str, Any] = _option(  # noqa: RUF009 (a field with metadata)
        kind="pairs", flag="--loss-opt", help="an option of the loss, e.g. eps=0.01 (repeatable)"
    )
    seed: int = _option(0, type=int, commands=("train", "tune"))
    profile: str = _option("cpu", choices=lambda: sorted(PROFILES))
    output: str = _option(
        "dense", choices=_heads,
        help="output layer: nn.Linear (dense); the loss from WᵀW without the logits, for a "
        "spherical loss (linear); or the exact O(d²) SGD layer (factored)",
    )  # fmt: skip
    optimizer: str = _option(
        "sgd", choices=lambda: tuple(OPTIMIZERS),
        help="sgd (the profile's momentum, weight decay as L2) or adamw (lr 1e-3 unless given "
        "or tuned, decoupled weight decay)",
    )  # fmt: skip
    out: str = _option("runs", help="where run directories go (default: runs)")
    data_dir: str | None = _option(
        None, help="data folder (default: $SPHERICAL_LOSSES_DATA, else ~/.cache/spherical_losses)"
    )
    device: str = _option("cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    epochs: int | None = _option(None, type=int, bound=(">=", 1, ""), setting=True)
    batch_size: int | None = _option(
        None, type=int, bound=(">=", 1, ""), setting=True, help="the global batch size"
    )
    lr: float | None = _option(
        None, type=float, bound=(">", 0, ""), setting=True,
        help="learning rate (default: the tuned one, else the profile's; tune: fixed, unsearched)",
    )  # fmt: skip
    head_lr: float | None = _option(
        None, type=float, bound=(">", 0, ""), help="learning rate of the factored output layer"
    )
    # (a negative one would flip the step)
    clip: float | None = _option(
        None, type=float, bound=(">=", 0, " (0: no clipping)"), setting=True,
        help="gradient-norm clipping (0: none)",
    )  # fmt: skip
    weight_decay: float | None = _option(
        None, type=float, bound=(">=", 0, ""), setting=True,
        help="weight decay (sgd: L2 in the gradient; adamw: decoupled)",
    )  # fmt: skip
    train_limit: int | None = _option(
        None, type=int, bound=(">=", 1, ""), setting=True,
        help="train on the first N examples (tokens)",
    )  # fmt: skip
    vocab_size: int | None = _option(
        None, type=int, help="language models: keep the N most frequent words"
    )
    model_options: dict[str, Any] = _option(  # noqa: RUF009 (a field with metadata)
        kind="pairs", flag="--model-opt",
        help="an option of the task's model, e.g. dropout=0 (repeatable)",
    )  # fmt: skip
    dtype: str = _option("float32", choices=lambda: ("float32", "float64"))
    tuned_dir: str | None = _option(
        None,
        help="the folder of tuned settings, which tune writes and train and compare read "
        "(default: the package's tuned/ folder)",
    )
    ignore_tuned: bool = _option(
        False, kind="switch", commands=("train", "compare"),
        help="the profile's values even where a tune saved settings",
    )  # fmt: skip
    quiet: bool = _option(False, kind="switch", help="no progress bars or per-epoch lines")
    resume: bool = _option(
        False, kind="switch", commands=("train",), help="continue an interrupted run"
    )

    def settings(self) -> Settings:
        """The profile's settings with this run's tuned values and overrides (see
        :meth:`resolve`)."""
        return self.resolve().settings

    def resolve(self) -> Resolved:
        """The run's settings and loss options, each from the command line, else from the
        tuned settings of the task and profile (unless ``ignore_tuned``), else the profile's
        (the member's defaults for loss options); every option checked here.

        Raises :class:`RunError` (a ``ValueError``) naming the bad value and what was expected.
        """
        base = profile_settings(self)
        if self.dtype not in ("float32", "float64"):
            raise RunError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        changes: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            _check_bound(f.name, value, f.metadata.get("bound"))
            if f.metadata.get("setting"):
                changes[f.name] = value
        if self.model_options:
            changes["model"] = {**base.model, **_checked_model_options(self)}
        sources = {name: "command line" for name in changes}
        tuned = None if self.ignore_tuned else self._tuned_entry()
        loss_options = dict(self.loss_options)
        if tuned is not None:
            entry, path = tuned
            where = f"tuned ({path})"
            if "lr" not in changes:
                changes["lr"], sources["lr"] = float(entry["lr"]), where
            for key, value in entry.get("loss_options", {}).items():
                if key not in loss_options:
                    loss_options[key] = value
                    sources[f"loss_options.{key}"] = where
        sources.update({f"loss_options.{k}": "command line" for k in self.loss_options})
        member = family.get_member(self.loss, **loss_options)  # a bad loss or option fails here
        settings = base.replace(**changes)
        _head(self.output)(member).check(self, settings)
        self._check_optimizer(settings)
        for name in _optimizer(self.optimizer).replaces:
            sources.setdefault(name, f"--optimizer {self.optimizer}")
        for name in asdict(settings):
            sources.setdefault(name, f"profile {self.profile}")
        return Resolved(settings, loss_options, dict(sorted(sources.items())))

    def _check_optimizer(self, settings: Settings) -> None:
        if self.optimizer != "sgd" and settings.model.get("sparse"):
            raise RunError(
                f"--optimizer {self.optimizer} cannot train a sparse embedding (--model-opt "
                "sparse=1 gives sparse gradients, which only SGD takes); drop sparse or use "
                "--optimizer sgd"
            )

    def _tuned_entry(self) -> tuple[dict[str, Any], Any] | None:
        from .tuned import entry_key, read_entry

        try:
            key = entry_key(self.loss, self.output, self.optimizer)
            return read_entry(self.task, self.profile, key, self.tuned_dir)
        except ValueError as error:
            raise RunError(f"{error}; fix it, or give --ignore-tuned") from None

    def loss_spec(self) -> str:
        """``name`` or ``name(key=value,...)``: how tables name the loss."""
        if not self.loss_options:
            return self.loss
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.loss_options.items()))
        return f"{self.loss}({opts})"

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Resolved:
    """A run's resolved settings and loss options, and where each value came from
    (``"command line"``, ``"tuned (<file>)"`` or ``"profile <name>"``)."""

    settings: Settings
    loss_options: dict[str, Any]
    sources: dict[str, str]


def profile_settings(config: RunConfig) -> Settings:
    """The profile's settings for the task, with the optimizer's own where it replaces them."""
    if config.profile not in PROFILES:
        raise RunError(f"unknown profile {config.profile!r}; expected one of {', '.join(PROFILES)}")
    profile = PROFILES[config.profile]
    base = profile.get(config.task, profile["ptb"] if config.task == "text" else None)
    if base is None:
        raise RunError(f"unknown task {config.task!r}")
    return base.replace(**_optimizer(config.optimizer).replaces)


def _check_bound(name: str, value: Any, bound: tuple[str, float, str] | None) -> None:
    if bound is None:
        return
    op, limit, note = bound
    if not (value >= limit if op == ">=" else value > limit):
        raise RunError(f"--{name.replace('_', '-')} must be {op} {limit}{note}, got {value}")


def _checked_model_options(config: RunConfig) -> dict[str, Any]:
    allowed = model_options(config.task)
    bad = sorted(set(config.model_options) - set(allowed))
    if bad:
        raise RunError(
            f"unknown model option(s) {', '.join(bad)} for task {config.task!r}; "
            f"expected {', '.join(allowed)}"
        )
    for key, value in config.model_options.items():
        if not isinstance(value, int | float):
            raise RunError(f"model option {key} must be a number, got {value!r}")
    return config.model_options


# ---------------------------------------------------------------------------- command lines


def parse_value(text: str) -> Any:
    """``--loss-opt`` values: int, float, None, or the string itself."""
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """``["key=value", ...]`` as a dict (values through :func:`parse_value`)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} takes key=value, got {pair!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def _flag(f: Any) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _declared(command: str) -> list[Any]:
    return [f for f in fields(RunConfig) if command in f.metadata["commands"]]


def add_run_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The run options that ``command`` takes, as declared in :class:`RunConfig`."""
    for f in _declared(command):
        meta = f.metadata
        if meta["kind"] == "switch":
            parser.add_argument(_flag(f), dest=f.name, action="store_true", help=meta["help"])
        elif meta["kind"] == "pairs":
            parser.add_argument(
                _flag(f), dest=f.name, action="append", default=[], metavar="KEY=VALUE",
                help=meta["help"],
            )  # fmt: skip
        else:
            required = f.default is MISSING
            parser.add_argument(
                _flag(f), dest=f.name, type=meta["type"], required=required,
                default=None if required else f.default, help=meta["help"],
                choices=meta["choices"]() if meta["choices"] else None,
            )  # fmt: skip


def config_from_args(args: argparse.Namespace, **per_run: Any) -> RunConfig:
    """The :class:`RunConfig` of a parsed command line (``per_run``: what the command sets
    itself, e.g. ``compare``'s loss and seed); checked before any work starts."""
    values: dict[str, Any] = {}
    for f in fields(RunConfig):
        if f.name in per_run or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.metadata["kind"] == "pairs":
            value = parse_options(value, _flag(f))
        values[f.name] = value
    config = RunConfig(**values, **per_run)
    config.settings()  # checks every option
    return config


def passthrough(config: RunConfig, command: str = "compare") -> list[str]:
    """The command line that gives ``config``'s options of ``command`` back to ``train``."""
    out: list[str] = []
    for f in _declared(command):
        value = getattr(config, f.name)
        kind = f.metadata["kind"]
        if kind == "switch":
            out += [_flag(f)] if value else []
        elif kind == "pairs":
            for key, item in value.items():
                out += [_flag(f), f"{key}={item}"]
        elif value is not None:
            out += [_flag(f), str(value)]
    return out
