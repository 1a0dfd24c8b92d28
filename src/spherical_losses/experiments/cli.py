"""The ``spherical-losses`` command line: ``train``, ``compare``, ``tune`` and ``report``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from .options import add_run_options

    parser = argparse.ArgumentParser(
        prog="spherical-losses",
        description="Train and compare the spherical loss family on real tasks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="one run into its own run directory")
    add_run_options(t, "train")

    c = sub.add_parser(
        "compare", help="the grid of losses × seeds; skips finished runs, resumes interrupted ones"
    )
    add_run_options(c, "compare")
    c.add_argument("--losses", required=True, help="comma-separated loss names")
    c.add_argument("--seeds", type=int, default=3, help="seeds 0 .. K-1 (default 3)")

    u = sub.add_parser(
        "tune",
        help="select a loss's learning rate and options on held-out data (Optuna); saves them "
        "for train and compare",
    )
    add_run_options(u, "tune")
    u.add_argument("--trials", type=int, default=20, help="finished trials of the study (20)")
    u.add_argument(
        "--storage",
        help="the study's database URL (default: sqlite:///<out>/tune/<task>-<profile>/study.db); "
        "several processes given one URL share the study",
    )

    for p in (t, c, u):
        p.add_argument(
            "--download", action="store_true", help="fetch missing data from the official sources"
        )

    r = sub.add_parser("report", help="Markdown/CSV tables and PNG plots of finished runs")
    r.add_argument(
        "results_dir",
        help="a folder of run directories (e.g. runs/mnist), or of a tune (runs/tune/mnist-cpu)",
    )
    r.add_argument("--to", help="where to write the report (default: RESULTS_DIR)")
    return parser


def _load_data(args: argparse.Namespace) -> None:
    from .data import TASKS, download, resolve_data_dir

    if args.download and args.task in TASKS:
        download(args.task, resolve_data_dir(args.data_dir))


def _train(args: argparse.Namespace) -> int:
    from .options import config_from_args
    from .train import run_dir, train

    config = config_from_args(args)
    _load_data(args)
    final = train(config)
    if not args.quiet:
        print(f"finished {run_dir(config)}: {json.dumps(final['metrics'])}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .options import config_from_args, passthrough
    from .report import write_report
    from .runs import check_same_run, run_dir, run_record

    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    if not losses:
        raise ValueError("--losses needs at least one loss name")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    configs = [
        config_from_args(args, loss=loss, seed=seed, resume=True)
        for loss in losses
        for seed in range(args.seeds)
    ]
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
        cmd = [sys.executable, "-m", "spherical_losses", "train", "--resume", *passthrough(config)]
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


def _tune(args: argparse.Namespace) -> int:
    from .options import config_from_args
    from .tune import tune

    config = config_from_args(args)
    _load_data(args)
    entry = tune(config, args.trials, args.storage)
    if entry["lr"] is None:
        print(f"no finished trial with a finite {entry['metric']}: nothing saved", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"selected: {json.dumps(entry)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import write_report, write_tuning_report

    folder, to = Path(args.results_dir), Path(args.to) if args.to else None
    if any(folder.glob("trials-*.csv")):  # a tune's folder: <out>/tune/<task>-<profile>
        md = write_tuning_report(folder, to)
    else:
        md, _ = write_report(folder, to)
    print(md.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spherical-losses`` and ``python -m spherical_losses``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        commands = {"train": _train, "compare": _compare, "tune": _tune, "report": _report}
        return commands[args.command](args)
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
