"""The ``spherical-losses`` command line: ``train``, ``compare`` and ``report``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import family

__all__ = ["main"]


def _value(text: str) -> Any:
    """``--loss-opt`` values: int, float, None, or the string itself."""
    if text.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _options(pairs: Sequence[str], what: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} takes key=value, got {pair!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from .tasks import PROFILES, task_names

    p.add_argument("--task", required=True, choices=task_names())
    p.add_argument("--profile", default="cpu", choices=sorted(PROFILES))
    p.add_argument(
        "--loss-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the loss, e.g. eps=0.01 (repeatable)",
    )
    p.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the task's model, e.g. dropout=0 (repeatable)",
    )
    p.add_argument(
        "--output",
        default="dense",
        choices=("dense", "factored"),
        help="output layer: nn.Linear, or the exact O(d²) FactoredSphericalLoss",
    )
    p.add_argument(
        "--data-dir",
        help="data folder (default: $SPHERICAL_LOSSES_DATA, else ~/.cache/spherical_losses)",
    )
    p.add_argument(
        "--download", action="store_true", help="fetch missing data from the official sources"
    )
    p.add_argument("--out", default="runs", help="where run directories go (default: runs)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="the global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--head-lr", type=float, help="learning rate of the factored output layer")
    p.add_argument("--clip", type=float, help="gradient-norm clipping (0: none)")
    p.add_argument("--train-limit", type=int, help="train on the first N examples (tokens)")
    p.add_argument("--vocab-size", type=int, help="language models: keep the N most frequent words")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spherical-losses",
        description="Train and compare the spherical loss family on real tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one run into its own run directory")
    _add_run_options(t)
    t.add_argument("--loss", required=True, help=f"one of {', '.join(family.member_names())}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue an interrupted run")

    c = sub.add_parser(
        "compare", help="the grid of losses × seeds; skips finished runs, resumes interrupted ones"
    )
    _add_run_options(c)
    c.add_argument("--losses", required=True, help="comma-separated loss names")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. K-1 (default 3)")

    r = sub.add_parser("report", help="Markdown/CSV tables and PNG plots of finished runs")
    r.add_argument("results_dir", help="a folder of run directories (e.g. runs/mnist)")
    r.add_argument("--to", help="where to write the report (default: RESULTS_DIR)")
    return parser


def _config(args: argparse.Namespace, loss: str, seed: int, resume: bool) -> Any:
    from .train import RunConfig

    loss_options = _options(args.loss_opt, "--loss-opt")
    family.get_member(loss, **loss_options)  # a bad loss or option fails here, before any work
    model_opts = _options(args.model_opt, "--model-opt")
    config = RunConfig(
        task=args.task,
        loss=loss,
        loss_options=loss_options,
        seed=seed,
        profile=args.profile,
        output=args.output,
        out=args.out,
        data_dir=args.data_dir,
        device=args.device,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        head_lr=args.head_lr,
        clip=args.clip,
        train_limit=args.train_limit,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
        quiet=args.quiet,
        resume=resume,
        model_options=model_opts,
    )
    config.settings()  # checks the overrides
    return config


def _load_data(args: argparse.Namespace) -> None:
    from .data import TASKS, download, resolve_data_dir

    if args.download and args.task in TASKS:
        download(args.task, resolve_data_dir(args.data_dir))


def _train(args: argparse.Namespace) -> int:
    from .train import run_dir, train

    config = _config(args, args.loss, args.seed, args.resume)
    _load_data(args)
    final = train(config)
    if not args.quiet:
        print(f"finished {run_dir(config)}: {json.dumps(final['metrics'])}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .report import write_report
    from .train import check_same_run, run_dir, run_record

    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if not losses:
        raise ValueError("--losses needs at least one loss name")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    configs = [_config(args, loss, seed, True) for loss in losses for seed in range(args.seeds)]
    for config in configs:  # before any work: a run there with other settings is no result
        check_same_run(run_dir(config), run_record(config))
    _load_data(args)
    failed = []
    for config in configs:
        folder = run_dir(config)
        if (folder / "final.json").exists():
            print(f"done already: {folder}")
            continue
        # Each run in its own process: a crash of one leaves the others' results intact.
        cmd = [sys.executable, "-m", "spherical_losses", "train", "--resume", *_passthrough(args)]
        cmd += ["--loss", config.loss, "--seed", str(config.seed)]
        print(f"running: {folder}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(str(folder))
    results = Path(args.out) / args.task
    if results.exists():
        md, _ = write_report(results)
        print(md.read_text())
    if failed:
        print("failed runs:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = [
        "--task",
        args.task,
        "--profile",
        args.profile,
        "--output",
        args.output,
        "--out",
        args.out,
    ]
    for flag in (
        "data_dir",
        "epochs",
        "batch_size",
        "lr",
        "head_lr",
        "clip",
        "train_limit",
        "vocab_size",
        "device",
    ):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    out += ["--dtype", args.dtype]
    for opt in args.loss_opt:
        out += ["--loss-opt", opt]
    for opt in args.model_opt:
        out += ["--model-opt", opt]
    if args.quiet:
        out.append("--quiet")
    return out


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    md, _ = write_report(Path(args.results_dir), Path(args.to) if args.to else None)
    print(md.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spherical-losses`` and ``python -m spherical_losses``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "compare": _compare, "report": _report}[args.command](args)
    except (ValueError, FileNotFoundError) as err:  # DataError and RunError are ValueErrors
        print(f"spherical-losses: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spherical-losses: interrupted; continue with --resume", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under torchrun: shut the process group down before the interpreter exits.

    With torch 2.13's gloo backend, a worker thread releases each finished collective's
    tensors a moment after the collective returns, and needs the GIL to do so. If the
    interpreter is already finalizing, that thread aborts the process (SIGABRT, "terminate
    called without an active exception") after all its work is done. ``destroy_process_group``
    does not stop those threads once torch._dynamo has taken references to the group (it does
    when an optimizer is first created), so the wait below gives them the GIL first.
    ``benchmarks/gloo_exit_check.py`` counts the aborts with and without it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.05)
