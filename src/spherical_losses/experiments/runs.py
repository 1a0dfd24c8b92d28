"""A run's folder: where it lives, what makes it the run it is, and its files.

A run lives in its own directory::

    <out>/<task>/<loss>[-<output>][-<optimizer>]/seed-<N>/
        config.json      what was asked for, with the resolved settings
        metrics.csv      one row per finished epoch
        checkpoint.pt    written atomically after every epoch (``--resume`` continues from it)
        final.json       written last, atomically: the run is finished when it exists

(``-<output>`` and ``-<optimizer>`` where not ``dense`` and ``sgd``.) Checkpoints hold only
tensors, numbers, strings, lists and dicts, and are read with ``torch.load(...,
weights_only=True)``: a tampered run folder cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .options import RunConfig, RunError
from .tuned import run_name

__all__ = ["RunFolder", "check_same_run", "run_dir", "run_record"]

# What makes a run the run it is: a run directory's config.json must agree on these before
# --resume continues it or `compare` counts it as done (out, data_dir, device, quiet may differ).
_IDENTITY = (
    "task",
    "loss",
    "loss_options",
    "seed",
    "profile",
    "output",
    "optimizer",
    "head_lr",
    "vocab_size",
    "dtype",
    "settings",
    "resolved_loss_options",
    "world_size",
)
# (not in the config.json of runs made before tuned settings existed: not compared there)
_ADDED_LATER = ("resolved_loss_options",)
# What a run made before a key existed had: every run before --optimizer trained with SGD.
_BEFORE = {"optimizer": "sgd"}


def run_dir(config: RunConfig) -> Path:
    spec = config.loss_spec().replace("(", "_").replace(")", "").replace(",", "_")
    name = run_name(spec, config.output, config.optimizer)
    return Path(config.out) / config.task / name / f"seed-{config.seed}"


def run_record(config: RunConfig, world_size: int = 1) -> dict[str, Any]:
    """What ``config.json`` holds: the configuration, its resolved settings, the processes."""
    resolved = config.resolve()
    return {
        **config.record(),
        "settings": asdict(resolved.settings),
        "resolved_loss_options": resolved.loss_options,
        "sources": resolved.sources,
        "world_size": world_size,
    }


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
        if key in _ADDED_LATER and key not in saved:
            continue
        old, new = saved.get(key, _BEFORE.get(key)), now.get(key)
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


def atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


@dataclass
class RunFolder:
    """One run's directory and the record (``config.json``) that names the run."""

    path: Path
    record: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def final(self) -> Path:
        return self.path / "final.json"

    def claim(self, resume: bool) -> dict[str, Any] | None:
        """Makes sure this run may write here; returns ``final.json`` if the run is finished
        (and ``resume`` keeps it). An existing run is continued only with ``resume`` and the
        same settings."""
        if self.final.exists():
            if not resume:
                raise RunError(
                    f"{self.path} holds a finished run; use --resume to keep it, or another --out"
                )
            check_same_run(self.path, self.record)
            return json.loads(self.final.read_text())
        if self.checkpoint.exists():
            if not resume:
                raise RunError(f"{self.path} holds an interrupted run; use --resume to continue it")
            check_same_run(self.path, self.record)
        return None

    def write_config(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "config.json", json.dumps(self.record, indent=2) + "\n")

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        keys: list[str] = []
        for row in rows:
            keys += [k for k in row if k not in keys]
        lines = [",".join(keys)]
        lines += [",".join(_fmt(row.get(k, "")) for k in keys) for row in rows]
        write_text(self.path / "metrics.csv", "\n".join(lines) + "\n")

    def write_final(self, final: dict[str, Any]) -> None:
        write_text(self.final, json.dumps(final, indent=2) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.checkpoint, lambda p: torch.save(state, p))

    def load_checkpoint(self, device: torch.device) -> dict[str, Any]:
        """The checkpoint, read with ``weights_only=True``: tensors, numbers, strings, lists
        and dicts only; a file holding anything else is refused before any of it runs."""
        try:
            return torch.load(self.checkpoint, map_location=device, weights_only=True)
        except pickle.UnpicklingError as error:
            if "Weights only load failed" not in str(error):
                raise RunError(self._unreadable(error)) from None
            unsupported = str(error).partition("Unsupported global: ")[2].split("\n")[0].strip()
            raise RunError(
                f"cannot read {self.checkpoint}: it holds a pickled object "
                f"({unsupported or 'not plain data'}), not only tensors, numbers and strings as "
                "a checkpoint of this suite does; it was refused without running it. Delete it "
                "to start the run again"
            ) from None
        except Exception as error:  # (whatever a damaged file makes the reader raise)
            raise RunError(self._unreadable(error)) from None

    def _unreadable(self, error: Exception) -> str:
        return (
            f"cannot read {self.checkpoint} ({type(error).__name__}: {error}); delete it to "
            "start the run again"
        )
