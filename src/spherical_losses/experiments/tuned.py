"""Tuned settings: what ``tune`` selected per task, profile and loss, read by ``train``.

One JSON file per task and profile, ``<task>-<profile>.json``, in the package's ``tuned/``
folder (shipped with it) or in ``--tuned-dir``::

    {"task": "mnist", "profile": "cpu",
     "losses": {"spherical": {"lr": 0.002, "loss_options": {"eps": 0.01},
                              "metric": "valid_error", "value": 1.9, ...}, ...}}

A loss trained with ``--output factored`` has its own entry, ``<loss>-factored``, and one
trained with ``--optimizer adamw`` too (``<loss>-adamw``, ``<loss>-linear-adamw``). Only a real
tune writes these files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["TUNED_DIR", "TUNED_DIR_ENV_VAR", "entry_key", "read_entry", "tuned_path", "write_entry"]

#: Where the tuned settings shipped with the package live.
TUNED_DIR = Path(__file__).resolve().parent / "tuned"

#: Environment variable naming another folder of tuned settings when ``--tuned-dir`` is not
#: given (the tests point it at an empty folder, so that shipped settings do not move them).
TUNED_DIR_ENV_VAR = "SPHERICAL_LOSSES_TUNED_DIR"


def tuned_path(task: str, profile: str, tuned_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<tuned_dir>/<task>-<profile>.json``; by default in ``$SPHERICAL_LOSSES_TUNED_DIR``,
    else in :data:`TUNED_DIR`."""
    folder = tuned_dir if tuned_dir is not None else os.environ.get(TUNED_DIR_ENV_VAR) or TUNED_DIR
    return Path(folder) / f"{task}-{profile}.json"


def entry_key(loss: str, output: str = "dense", optimizer: str = "sgd") -> str:
    """``<loss>[-<output>][-<optimizer>]``: the output and optimizer where not the default."""
    return run_name(loss, output, optimizer)


def run_name(spec: str, output: str, optimizer: str) -> str:
    """``spec``, with ``-<output>`` and ``-<optimizer>`` where not ``dense`` and ``sgd``."""
    chosen = [v for v, default in ((output, "dense"), (optimizer, "sgd")) if v != default]
    return "-".join([spec, *chosen])


def _read(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the tuned settings {path} ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("losses"), dict):
        raise ValueError(f"{path} is not a file of tuned settings (no 'losses' table)")
    return content


def read_entry(
    task: str, profile: str, key: str, tuned_dir: str | os.PathLike[str] | None = None
) -> tuple[dict[str, Any], Path] | None:
    """The tuned entry ``key`` for ``task`` and ``profile``, with its file; ``None`` if the
    file or the entry does not exist."""
    path = tuned_path(task, profile, tuned_dir)
    if not path.exists():
        return None
    entry = _read(path)["losses"].get(key)
    return None if entry is None else (entry, path)


def write_entry(
    task: str,
    profile: str,
    key: str,
    entry: dict[str, Any],
    tuned_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Sets entry ``key`` of the file (the others kept), replacing the file atomically."""
    path = tuned_path(task, profile, tuned_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = _read(path) if path.exists() else {"task": task, "profile": profile, "losses": {}}
    content["losses"][key] = entry
    content["losses"] = dict(sorted(content["losses"].items()))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)
    return path
