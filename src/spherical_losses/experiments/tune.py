"""Selecting each loss's settings on held-out data: ``spherical-losses tune``.

A study per task, profile and loss, kept by Optuna in a database (a SQLite file under
``<out>/tune/<task>-<profile>/`` by default, or any ``--storage`` URL): a killed ``tune``
resumes it, and several processes or machines given the same URL work on one study. Each
trial is one training run (:func:`~.train.train`) on the task built with ``holdout=True``:
it trains on the training set less a validation split and is scored there; the test split is
never loaded. Every loss gets the same budget (``--trials`` × the profile's epochs), and a
trial whose validation metric is worse than the median of the earlier trials at the same
epoch is stopped there (``MedianPruner``).

The search: the learning rate on a log scale over four decades, from 1/1000 to 10 times the
profile's (AdamW's 1e-3 under ``--optimizer adamw``) (:data:`LR_RANGE`; the members differ in
curvature by orders of magnitude, and the range must hold each one's best setting inside it:
a best setting within a factor :data:`EDGE_FACTOR` of either end is flagged, in the tuned file
and on stderr), and each member's own options (:data:`MEMBER_SPACES`); an option given with
``--loss-opt`` (or ``--lr``) is fixed instead. The selected settings go to the tuned file
(:mod:`.tuned`) that ``train`` and ``compare`` read.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from .options import RunConfig, RunError, profile_settings
from .report import write_tuning_report
from .tasks import Settings, Task, make_task
from .tuned import entry_key, write_entry

__all__ = ["EDGE_FACTOR", "LR_RANGE", "MEMBER_SPACES", "search_space", "tune"]

Sampler = Callable[[Any], Any]  # an optuna.Trial -> the option's value

#: The learning rates searched, as factors of the profile's: the same range for every loss.
LR_RANGE = (1e-3, 10.0)
#: A best learning rate within this factor of either end of the range is "at the edge".
EDGE_FACTOR = 10**0.25


def _bound_xi(trial: Any) -> float | None:
    if trial.suggest_categorical("xi_mode", ["optimal", "fixed"]) == "optimal":
        return None
    return trial.suggest_float("xi", 0.1, 10.0, log=True)


def _z_loss_b(num_classes: int) -> Sampler:
    # z = (o_c − μ)/σ never exceeds sqrt(D − 1): an offset beyond it never saturates.
    return lambda trial: trial.suggest_float("b", 0.0, math.sqrt(num_classes - 1))


#: Each member's own options and how to search them (given the number of classes). Taylor's
#: margin is left out: it makes another loss (Banerjee et al. 2020) than the paper's.
MEMBER_SPACES: dict[str, Callable[[int], dict[str, Sampler]]] = {
    "spherical": lambda d: {"eps": lambda t: t.suggest_float("eps", 1e-4, 1.0, log=True)},
    "z_loss": lambda d: {
        "a": lambda t: t.suggest_float("a", 0.1, 10.0, log=True),
        "b": _z_loss_b(d),
    },
    "softmax_bound": lambda d: {"xi": _bound_xi},
}


def search_space(config: RunConfig, num_classes: int) -> dict[str, Sampler]:
    """What a trial draws: ``"lr"`` and ``"loss_options.<name>"``, less what ``config`` fixes.

    Raises :class:`RunError` when nothing is left to search.
    """
    space: dict[str, Sampler] = {}
    if config.lr is None:
        lr = profile_settings(config).lr
        low, high = lr * LR_RANGE[0], lr * LR_RANGE[1]
        space["lr"] = lambda t: t.suggest_float("lr", low, high, log=True)
    for name, sample in MEMBER_SPACES.get(config.loss, lambda d: {})(num_classes).items():
        if name not in config.loss_options:
            space[f"loss_options.{name}"] = sample
    if not space:
        fixed = ", ".join(["lr", *config.loss_options]) if config.lr is not None else "lr"
        raise RunError(
            f"nothing to tune for {config.loss!r}: the search space is empty ({fixed} given on "
            "the command line); leave out --lr or a --loss-opt to search it"
        )
    return space


def _metric(task: Task, config: RunConfig) -> str:
    """The validation metric a trial minimizes: the task's headline, or, for a member with no
    probabilities on a language model (no perplexity), its widest top-k error."""
    from .. import family

    metric = task.metric("valid")
    if "perplexity" in metric and not family.get_member(config.loss).has_probabilities:
        k = max(task.topk)
        metric = "valid_error" if k == 1 else f"valid_top{k}_error"
    return metric


def _storage(url: str | None, folder: Path) -> Any:
    import optuna

    if url is None:
        folder.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{folder.resolve() / 'study.db'}"
    try:
        # Heartbeats: a trial whose process was killed is marked failed after the grace
        # period, when any process next works on the study. (Experimental in Optuna 4 by
        # name only: it has been there since 2.9.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    except Exception as error:  # (SQLAlchemy's many: bad URL, missing driver, no such file)
        raise RunError(
            f"--storage {url!r}: cannot open it ({type(error).__name__}: {error}); expected a "
            "database URL such as sqlite:///path/to/study.db or postgresql://host/db"
        ) from None
    return storage


def _without_password(url: str) -> str:
    """The URL as the tuned file and the screen may show it (the file is committed)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def tune(config: RunConfig, trials: int, storage: str | None = None) -> dict[str, Any]:
    """Runs the study of ``config``'s task, profile and loss until it holds ``trials``
    finished trials; writes and returns the selected settings (the tuned entry)."""
    import optuna

    if trials < 1:
        raise RunError(f"--trials must be >= 1, got {trials}")
    # The search starts from the profile, whatever a tuned file holds.
    config = replace(config, ignore_tuned=True)
    settings = config.settings()  # (checks every option)
    key = entry_key(config.loss, config.output, config.optimizer)
    folder = Path(config.out) / "tune" / f"{config.task}-{config.profile}"
    from .data import resolve_data_dir

    task = make_task(config.task, resolve_data_dir(config.data_dir), config.vocab_size, True)
    space = search_space(config, task.num_classes)
    metric = _metric(task, config)
    study_name = f"{config.task}-{config.profile}-{key}"
    db = _storage(storage, folder)
    shown_url = _without_password(storage or f"sqlite:///{folder / 'study.db'}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=db,
        load_if_exists=True,
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
    )
    _check_same_study(study, config, settings)
    # Seeded by what the study holds, so that a resumed tune draws new settings.
    seed = config.seed * 1_000_003 + len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=done))
    if not config.quiet:
        print(
            f"tune {study_name}: {remaining} of {trials} trials × {settings.epochs} epochs to "
            f"run, on {metric} (study {study_name!r} in {shown_url})",
            flush=True,
        )
    if remaining > 0:
        objective = _objective(config, task, space, metric, folder / key)
        study.optimize(
            objective,
            n_trials=remaining,
            callbacks=[
                optuna.study.MaxTrialsCallback(trials, states=done),
                lambda study, trial: _say(study, trial, metric, config.quiet),
            ],
        )
    entry = select(study, metric, trials, settings.epochs, shown_url)
    _write_trials(study, folder / f"trials-{key}.csv", metric, settings.epochs)
    write_tuning_report(folder)
    if entry.get("lr") is not None:
        write_entry(config.task, config.profile, key, entry, config.tuned_dir)
    return entry


def _check_same_study(study: Any, config: RunConfig, settings: Settings) -> None:
    """Records what the study's trials share (all but what is searched and the budget), or
    refuses to add trials of other settings to a study that holds some."""
    fixed = {k: v for k, v in asdict(settings).items() if k != "lr" or config.lr is not None}
    what = json.loads(json.dumps({
        "settings": fixed, "loss_options": config.loss_options, "output": config.output,
        "head_lr": config.head_lr, "vocab_size": config.vocab_size, "dtype": config.dtype,
        "seed": config.seed,
    }))  # fmt: skip
    saved = study.user_attrs.get("run")
    if saved is None:
        study.set_user_attr("run", what)
        return
    differences = [
        f"{key}: {saved.get(key)!r} there, {what[key]!r} now"
        for key in what
        if saved.get(key) != what[key]
    ]
    if differences:
        raise RunError(
            f"the study {study.study_name!r} holds trials made with other settings "
            f"({'; '.join(differences)}); give the same settings to continue it, or another "
            "--out or --storage"
        )


def _objective(
    config: RunConfig, task: Task, space: dict[str, Sampler], metric: str, folder: Path
) -> Callable[[Any], float]:
    import optuna

    from .train import train

    def objective(trial: Any) -> float:
        drawn = {name: sample(trial) for name, sample in space.items()}
        options = {k.partition(".")[2]: v for k, v in drawn.items() if k.startswith("loss_")}
        run = replace(
            config,
            lr=drawn.get("lr", config.lr),
            loss_options={**config.loss_options, **options},
            out=str(folder / f"trial-{trial.number}"),
            resume=False,
            ignore_tuned=True,
        )
        trial.set_user_attr("lr", run.lr)
        trial.set_user_attr("loss_options", run.loss_options)

        def report(row: dict[str, Any]) -> None:
            trial.report(_finite(row.get(metric)), row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {row['epoch']}")

        final = train(run, task, on_epoch=report)
        trial.set_user_attr("diverged", final["diverged_at_epoch"] is not None)
        trial.set_user_attr("epochs_run", final["epochs_run"])
        return _finite(final["metrics"].get(metric))

    return objective


def _finite(value: float | None) -> float:
    """A metric as Optuna takes it: a diverged run's nan or missing value as +inf."""
    return math.inf if value is None or math.isnan(value) else float(value)


def _say(study: Any, trial: Any, metric: str, quiet: bool) -> None:
    if quiet:
        return
    settings = {"lr": trial.user_attrs.get("lr"), **trial.user_attrs.get("loss_options", {})}
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
    )
    state = trial.state.name.lower()
    if trial.user_attrs.get("diverged"):
        state = "diverged"
    value = "" if trial.value is None else f" {metric} {trial.value:.4g}"
    print(f"trial {trial.number} ({shown}):{value} [{state}]", flush=True)


def select(study: Any, metric: str, trials: int, epochs: int, storage: str) -> dict[str, Any]:
    """The tuned entry: the best trial that did not diverge; if every trial diverged, the
    best finite one, marked ``diverged_everywhere``."""
    import optuna

    states = optuna.trial.TrialState
    complete = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    finite = [t for t in complete if t.value is not None and math.isfinite(t.value)]
    trained = [t for t in finite if not t.user_attrs.get("diverged")]
    best = min(trained or finite, key=lambda t: t.value, default=None)
    count = {
        "complete": len(complete),
        "pruned": len(study.get_trials(deepcopy=False, states=(states.PRUNED,))),
        "diverged": sum(bool(t.user_attrs.get("diverged")) for t in complete),
        "failed": len(study.get_trials(deepcopy=False, states=(states.FAIL,))),
    }
    entry: dict[str, Any] = {
        "lr": None if best is None else best.user_attrs["lr"],
        "loss_options": {} if best is None else best.user_attrs["loss_options"],
        "metric": metric,
        "value": None if best is None else best.value,
        "trial": None if best is None else best.number,
        "diverged_everywhere": not trained,
        "lr_at_edge": _at_edge(best),
        "trials": count,
        "budget": {"trials": trials, "epochs": epochs},
        "study": study.study_name,
        "storage": storage,
        "validation": "held out from the training set (the test split is never read)",
    }
    if entry["lr_at_edge"]:
        print(
            f"{study.study_name}: the best learning rate {entry['lr']:.3g} is at the "
            f"{entry['lr_at_edge']} edge of the range searched; widen the range",
            file=sys.stderr,
            flush=True,
        )
    if not trained:
        print(
            f"{study.study_name}: training diverged at every setting tried"
            + ("" if best is None else f"; the best finite trial is {best.number}"),
            file=sys.stderr,
            flush=True,
        )
    return entry


def _at_edge(best: Any) -> str | None:
    """``'low'`` or ``'high'`` when the best trial's learning rate (if searched) lies within
    :data:`EDGE_FACTOR` of that end of its range, else None."""
    if best is None or "lr" not in best.distributions:
        return None
    span, lr = best.distributions["lr"], best.params["lr"]
    if lr < span.low * EDGE_FACTOR:
        return "low"
    if lr > span.high / EDGE_FACTOR:
        return "high"
    return None


def _write_trials(study: Any, path: Path, metric: str, epochs: int) -> None:
    """One row per trial, for ``report``'s tuning table and plot."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        options = ";".join(f"{k}={v}" for k, v in t.user_attrs.get("loss_options", {}).items())
        rows.append({
            "study": study.study_name, "trial": t.number, "state": t.state.name.lower(),
            "lr": t.user_attrs.get("lr"), "loss_options": options,
            "metric": metric, "value": t.value, "diverged": bool(t.user_attrs.get("diverged")),
            "epochs_run": t.user_attrs.get("epochs_run", len(t.intermediate_values)),
            "epochs": epochs,
        })  # fmt: skip
    buf = io.StringIO()
    fields = ["study", "trial", "state", "lr", "loss_options", "metric", "value", "diverged"]
    writer = csv.DictWriter(buf, [*fields, "epochs_run", "epochs"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(buf.getvalue())
