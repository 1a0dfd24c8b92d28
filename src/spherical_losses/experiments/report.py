"""Tables and plots of finished runs: mean ± standard deviation over seeds, beside the paper."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .tasks import PAPER_RESULTS
from .tasks import headline as _headline

__all__ = ["collect", "write_report", "write_tuning_report"]


def collect(results_dir: Path) -> list[dict[str, Any]]:
    """Every finished run (a ``final.json``) below ``results_dir``, with its metric history."""
    runs = []
    for final in sorted(results_dir.rglob("final.json")):
        try:
            record = json.loads(final.read_text())
        except ValueError as error:  # (a run directory edited or damaged by hand)
            raise ValueError(f"{final} is not valid JSON ({error})") from None
        history_path = final.with_name("metrics.csv")
        history = []
        if history_path.exists():
            with history_path.open() as f:
                history = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        record["history"] = history
        record["dir"] = str(final.parent)
        runs.append(record)
    return runs


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _diverged(run: dict[str, Any]) -> bool:
    """Whether the run's training diverged (runs before ``diverged_at_epoch`` existed: a
    non-finite test metric).
    """
    if run.get("diverged_at_epoch") is not None:
        return True
    return any(isinstance(v, float) and not math.isfinite(v) for v in run["metrics"].values())


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; with a non-finite value (a diverged run's loss),
    the mean is that value and the deviation undefined (nan).
    """
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, math.nan
    return mean, statistics.stdev(values)


def _welch(x: list[float], base: list[float]) -> tuple[float, float, float] | None:
    """Difference of the means of ``x`` and ``base``, Welch's t and its degrees of freedom
    (Welch–Satterthwaite); ``None`` when undefined (fewer than 2 values, a non-finite value,
    no spread at all).
    """
    if len(x) < 2 or len(base) < 2 or not all(math.isfinite(v) for v in x + base):
        return None
    vx, vb = statistics.variance(x) / len(x), statistics.variance(base) / len(base)
    if vx + vb == 0:
        return None
    diff = statistics.fmean(x) - statistics.fmean(base)
    df = (vx + vb) ** 2 / (vx**2 / (len(x) - 1) + vb**2 / (len(base) - 1))
    return diff, diff / math.sqrt(vx + vb), df


def write_report(results_dir: Path, to: Path | None = None) -> tuple[Path, Path]:
    """Writes ``report.md``, ``report.csv``, ``curves.png`` and ``final.png``.

    Returns the paths of the Markdown and CSV tables.
    """
    results_dir = Path(results_dir)
    to = Path(to) if to is not None else results_dir
    runs = collect(results_dir)
    if not runs:
        raise ValueError(f"no finished runs (final.json) below {results_dir}")
    to.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        # (runs made before --optimizer trained with SGD)
        optimizer = run.get("optimizer", "sgd")
        output = run["output"] if optimizer == "sgd" else f"{run['output']}, {optimizer}"
        key = (run["task"], run["profile"], run["loss_spec"], output)
        groups[key].append(run)

    rows = []
    for (task, profile, spec, output), members in sorted(groups.items()):
        metric_names = sorted({k for r in members for k in r["metrics"] if k.startswith("test")})
        row: dict[str, Any] = {
            "task": task,
            "profile": profile,
            "loss": spec,
            "output": output,
            "seeds": len(members),
            "diverged": sum(_diverged(r) for r in members),
            "epochs": members[0]["epochs"],
        }
        for name in metric_names:
            values = [r["metrics"][name] for r in members if name in r["metrics"]]
            row[name], row[f"{name}_std"] = _mean_std(values)
        paper = PAPER_RESULTS.get(task, {}).get(spec) if output == "dense" else None
        row["paper"] = paper
        row["headline"] = _headline(task)
        # Against dense log-softmax of the same task and profile, on the headline metric.
        headline = row["headline"]
        baseline = groups.get((task, profile, "log_softmax", "dense"), [])
        compared = None
        if (spec, output) != ("log_softmax", "dense"):
            compared = _welch(
                [r["metrics"][headline] for r in members if headline in r["metrics"]],
                [r["metrics"][headline] for r in baseline if headline in r["metrics"]],
            )
        row["vs_log_softmax"], row["welch_t"], row["welch_df"] = compared or (None, None, None)
        rows.append(row)

    md_path, csv_path = to / "report.md", to / "report.csv"
    md_path.write_text(_markdown(rows))
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "headline"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path.write_text(buf.getvalue())
    _plots(groups, to)
    return md_path, csv_path


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        headline = mine[0]["headline"]
        others = sorted(
            {k for r in mine for k in r if k.startswith("test") and not k.endswith("_std")}
            - {headline}
        )
        unit = "" if "perplexity" in headline else " (%)"
        cols = [headline, *others]
        out.append(f"### {task}\n")
        out.append(
            "| loss | output | profile | seeds | diverged | epochs | "
            + " | ".join(c.replace("_", " ") + (unit if "error" in c else "") for c in cols)
            + " | paper | vs log_softmax |"
        )
        out.append("|" + "---|" * (8 + len(cols)))
        for r in mine:
            digits = 1 if "perplexity" in headline else 2
            cells = [
                _fmt(r[c], r[f"{c}_std"], digits if c == headline else 2) if c in r else "—"
                for c in cols
            ]
            paper = "—" if r["paper"] is None else f"{r['paper']}"
            versus = "—"
            if r["welch_t"] is not None:
                versus = (
                    f"{r['vs_log_softmax']:+.{digits}f} "
                    f"(t = {r['welch_t']:.2f}, df = {r['welch_df']:.1f})"
                )
            out.append(
                f"| {r['loss']} | {r['output']} | {r['profile']} | {r['seeds']} | {r['diverged']} "
                f"| {r['epochs']} | " + " | ".join(cells) + f" | {paper} | {versus} |"
            )
        out.append(
            "\nmean ± sample standard deviation over seeds (diverged: seeds whose training "
            "loss stopped being finite; their figures are those of the diverged model); the "
            "paper's figures are single runs of its own (larger) models. vs log_softmax: the "
            f"difference of the {headline.replace('_', ' ')} means against dense log-softmax "
            "of the same task and profile, with Welch's t and its degrees of freedom (at "
            "4 degrees of freedom, a two-sided 5 % test needs |t| > 2.78); — where either "
            "side has fewer than 2 seeds or a non-finite value.\n"
        )
    return "\n".join(out)


def _plots(groups: dict[tuple[str, str, str, str], list[dict[str, Any]]], to: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({key[0] for key in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    bars: list[tuple[str, str, float, float]] = []
    for ax, task in zip(axes[0], tasks, strict=True):
        metric = _headline(task)
        for (t, _profile, spec, output), members in sorted(groups.items()):
            if t != task:
                continue
            label = spec + (f" ({output})" if output != "dense" else "")
            curves = [
                [row.get(metric) for row in m["history"] if isinstance(row.get(metric), float)]
                for m in members
            ]
            length = min((len(c) for c in curves), default=0)
            if length:
                mean = [statistics.fmean(c[i] for c in curves) for i in range(length)]
                ax.plot(range(1, length + 1), mean, marker="o", label=label)
            finals = [m["metrics"][metric] for m in members if metric in m["metrics"]]
            if finals:
                mean, std = _mean_std(finals)
                bars.append((task, label, mean, 0.0 if math.isnan(std) else std))
        ax.set_title(f"{task}: {metric.replace('_', ' ')} (mean over seeds)")
        ax.set_xlabel("epoch")
        # (on a linear axis one diverged loss at chance flattens all the others)
        _log_scale(ax, "y", metric)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(to / "curves.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [b for b in bars if b[0] == task]
        ax.bar(
            range(len(mine)),
            [b[2] for b in mine],
            yerr=[b[3] for b in mine],
            capsize=4,
            color="tab:blue",
            alpha=0.8,
        )
        ax.set_xticks(range(len(mine)), [b[1] for b in mine], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}: final {_headline(task).replace('_', ' ')} (± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(to / "final.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------- tuning


def write_tuning_report(folder: Path, to: Path | None = None) -> Path:
    """``tuning.md`` and ``tuning.png`` from the ``trials-<loss>.csv`` files that ``tune``
    writes in ``folder``: per loss, the trials and the selected setting, and validation metric
    against learning rate. A loss that diverged at every setting tried is said to have, with
    its best finite trial. Returns the path of the Markdown table."""
    folder = Path(folder)
    to = Path(to) if to is not None else folder
    studies: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("trials-*.csv")):
        with path.open() as f:
            rows = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
        if rows:
            studies[path.stem.removeprefix("trials-")] = rows
    if not studies:
        raise ValueError(f"no tuning trials (trials-<loss>.csv) in {folder}")
    to.mkdir(parents=True, exist_ok=True)
    lines = [
        f"### tuning: {folder.name}\n",
        "| loss | metric | trials | pruned | diverged | best | lr | options | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, rows in studies.items():
        lines.append(_tuning_row(key, rows))
    lines.append(
        "\nvalidation split held out from the training set; best: the lowest validation "
        "metric of a finished trial that did not diverge (pruned trials stopped early at a "
        "metric worse than the median of earlier trials at that epoch).\n"
    )
    md = to / "tuning.md"
    md.write_text("\n".join(lines))
    _tuning_plot(studies, to / "tuning.png")
    return md


def _log_scale(ax: Any, axis: str, metric: str) -> None:
    """A log axis where the plotted values allow one (some positive), labelled so."""
    values = [v for line in ax.get_lines() for v in getattr(line, f"get_{axis}data")()]
    positive = any(isinstance(v, float | int) and v > 0 for v in values)
    if positive:
        getattr(ax, f"set_{axis}scale")("log")
    label = metric.replace("_", " ") + (" (log scale)" if positive else "")
    getattr(ax, f"set_{axis}label")(label)


def _finite_value(row: dict[str, Any]) -> bool:
    return isinstance(row["value"], float) and math.isfinite(row["value"])


def _tuning_row(key: str, rows: list[dict[str, Any]]) -> str:
    complete = [r for r in rows if r["state"] == "complete"]
    diverged = [r for r in complete if r["diverged"] == "True"]
    trained = [r for r in complete if r["diverged"] != "True" and _finite_value(r)]
    finite = [r for r in complete if _finite_value(r)]
    best = min(trained or finite, key=lambda r: r["value"], default=None)
    note = ""
    if not trained:
        note = "diverged at every setting tried" + (
            f"; best finite trial: {best['trial']:.0f}" if best is not None else ""
        )
    cells = ["—", "—", "—"]
    if best is not None:
        cells = [f"{best['value']:.4g}", f"{best['lr']:.3g}", str(best["loss_options"]) or "—"]
    pruned = sum(r["state"] == "pruned" for r in rows)
    return (
        f"| {key} | {rows[0]['metric']} | {len(complete) + pruned} | {pruned} | "
        f"{len(diverged)} | " + " | ".join(cells) + f" | {note} |"
    )


def _tuning_plot(studies: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, rows in studies.items():
        done = [r for r in rows if isinstance(r["lr"], float) and _finite_value(r)]
        ok = [r for r in done if r["diverged"] != "True" and r["state"] == "complete"]
        (line,) = ax.plot(
            [r["lr"] for r in ok], [r["value"] for r in ok], "o", label=key, alpha=0.8
        )
        # pruned trials (their metric where they stopped) and diverged ones, in the same colour
        for state, marker in (("pruned", "^"), ("diverged", "x")):
            mine = [r for r in done if (r["diverged"] == "True") == (state == "diverged")]
            mine = [r for r in mine if state == "diverged" or r["state"] == "pruned"]
            ax.plot(
                [r["lr"] for r in mine], [r["value"] for r in mine], marker,
                color=line.get_color(), alpha=0.6,
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    _log_scale(ax, "y", str(next(iter(studies.values()))[0]["metric"]))
    ax.set_title("tuning: validation metric against learning rate (^ pruned, x diverged)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
