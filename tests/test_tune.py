"""``spherical-losses tune``: a study on held-out data, resumable, whose settings train uses."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from test_experiments import (  # (and its autouse fixture: no shipped tuned settings)
    ENV,
    MNIST_FAST,
    make_mnist,
    no_tuned_settings,  # noqa: F401
    run_cli,
)

from spherical_losses.experiments import cli
from spherical_losses.experiments import tune as tune_module
from spherical_losses.experiments.options import (
    RunConfig,
    add_run_options,
    config_from_args,
    passthrough,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*are not the official MNIST:UserWarning")


@pytest.fixture(scope="module")
def train_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MNIST look-alike without its test files: a tune that opened them would fail."""
    root = make_mnist(tmp_path_factory.mktemp("train-only"))
    for path in (root / "mnist").glob("t10k-*"):
        path.unlink()
    return root


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The same training files as train_only (make_mnist draws them first), with test files.
    return make_mnist(tmp_path_factory.mktemp("data"))


def _study(out: Path, name: str) -> optuna.Study:
    url = f"sqlite:///{out / 'tune' / 'mnist-cpu' / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


def test_tune_records_a_study_and_train_uses_its_settings(
    train_only: Path, mnist_dir: Path, tmp_path: Path
) -> None:
    tuned = tmp_path / "tuned"
    common = ["--data-dir", str(train_only), "--out", str(tmp_path), "--tuned-dir", str(tuned)]
    code = cli.main(
        ["tune", *MNIST_FAST, "--loss", "spherical", "--trials", "2", "--epochs", "1", *common]
    )
    assert code == 0  # (the test split's files are absent: reading them would have failed)
    study = _study(tmp_path, "mnist-cpu-spherical")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2
    for t in finished:  # lr from 1/1000 to 10 times the profile's 0.05; eps in its range
        assert 5e-5 <= t.params["lr"] <= 0.5 and 1e-4 <= t.params["eps"] <= 1.0
    saved = json.loads((tuned / "mnist-cpu.json").read_text())["losses"]["spherical"]
    best = min((t for t in finished if t.value is not None), key=lambda t: t.value)
    assert saved["lr"] == best.params["lr"] and saved["loss_options"] == {"eps": best.params["eps"]}
    assert saved["value"] == best.value and saved["budget"] == {"trials": 2, "epochs": 1}
    assert (tmp_path / "tune/mnist-cpu/tuning.md").read_text().count("| spherical |") == 1
    assert (tmp_path / "tune/mnist-cpu/tuning.png").stat().st_size > 0

    # train picks the settings up, and says where each value came from
    run = ["train", *MNIST_FAST, "--loss", "spherical", "--epochs", "1", "--tuned-dir", str(tuned)]
    assert cli.main([*run, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "runs")]) == 0
    config = json.loads((tmp_path / "runs/mnist/spherical/seed-0/config.json").read_text())
    assert config["settings"]["lr"] == saved["lr"]
    assert config["resolved_loss_options"] == saved["loss_options"]
    where = f"tuned ({tuned / 'mnist-cpu.json'})"
    assert config["sources"]["lr"] == where and config["sources"]["loss_options.eps"] == where
    assert config["sources"]["epochs"] == "command line"
    assert config["sources"]["batch_size"] == "profile cpu"
    # an explicit --lr / --loss-opt wins over the tuned value
    explicit = [*run, "--lr", "0.01", "--loss-opt", "eps=0.5", "--data-dir", str(mnist_dir)]
    assert cli.main([*explicit, "--out", str(tmp_path / "explicit")]) == 0
    config = json.loads(
        (tmp_path / "explicit/mnist/spherical_eps=0.5/seed-0/config.json").read_text()
    )
    assert config["settings"]["lr"] == 0.01 and config["resolved_loss_options"] == {"eps": 0.5}
    assert config["sources"]["lr"] == "command line"
    assert config["sources"]["loss_options.eps"] == "command line"


def test_train_without_a_tuned_file_uses_the_profile_and_says_so(
    mnist_dir: Path, tmp_path: Path
) -> None:
    run = ["train", *MNIST_FAST, "--loss", "taylor", "--epochs", "1", "--data-dir", str(mnist_dir)]
    assert cli.main([*run, "--out", str(tmp_path), "--tuned-dir", str(tmp_path / "none")]) == 0
    config = json.loads((tmp_path / "mnist/taylor/seed-0/config.json").read_text())
    assert config["settings"]["lr"] == 0.05 and config["sources"]["lr"] == "profile cpu"
    assert config["resolved_loss_options"] == {}


def test_tune_on_a_corpus_reads_its_valid_split_and_never_its_test_split(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "text"  # train.txt and valid.txt only: opening test.txt would fail
    folder.mkdir()
    words = [f"w{i}" for i in range(30)]
    for name, lines in (("train", 200), ("valid", 30)):
        text = "\n".join(" ".join(words[(j * 7 + k) % 30] for k in range(8)) for j in range(lines))
        (folder / f"{name}.txt").write_text(text + "\n")
    result = run_cli(
        "tune", "--task", "text", "--loss", "z_loss", "--trials", "1", "--epochs", "1",
        "--batch-size", "4", "--model-opt", "hidden=8", "--data-dir", str(folder),
        "--out", str(tmp_path), "--tuned-dir", str(tmp_path / "t"), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "t/text-cpu.json").read_text())["losses"]["z_loss"]
    # the Z-loss defines no perplexity: it is scored by its top-10 error
    assert saved["metric"] == "valid_top10_error" and set(saved["loss_options"]) == {"a", "b"}


def test_a_killed_tune_resumes_the_same_study(train_only: Path, tmp_path: Path) -> None:
    shown = [a for a in MNIST_FAST if a != "--quiet"]  # (its progress lines are checked)
    args = [
        "tune", *shown, "--loss", "log_softmax", "--trials", "3", "--epochs", "3",
        "--data-dir", str(train_only), "--out", str(tmp_path), "--tuned-dir", str(tmp_path / "t"),
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "spherical_losses", *args], env=ENV)
    db = tmp_path / "tune/mnist-cpu/study.db"
    deadline = time.monotonic() + 300

    def finished() -> list[optuna.trial.FrozenTrial]:
        study = _study(tmp_path, "mnist-cpu-log_softmax")
        return [t for t in study.trials if t.state.is_finished()]

    def any_finished() -> bool:
        # Read-only and without Optuna: opening the study would create its tables, racing
        # the tune that is creating them ("table ... already exists" in one of the two).
        if not db.exists():
            return False
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                return bool(con.execute("select count(*) from trials where state = 'COMPLETE'")
                            .fetchone()[0])  # fmt: skip
        except sqlite3.OperationalError:  # (no such table yet, or the file is locked)
            return False

    while not any_finished():
        assert proc.poll() is None, "the tune ended before its first trial finished"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = finished()
    assert 1 <= len(first) < 3, "killed too late: the tune had finished"
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    study = _study(tmp_path, "mnist-cpu-log_softmax")
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == 3  # the budget counts the trials of before the kill
    # the same study: the trials finished before the kill are still there, unchanged
    kept = {t.number: t.params for t in done}
    assert all(kept[t.number] == t.params for t in first)
    assert f"{3 - len(first)} of 3 trials" in result.stdout
    # more trials of the same study under other settings are refused
    other = run_cli(*args, "--model-opt", "dropout=0")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "holds trials made with other settings (settings: " in other.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--loss taylor --storage nosuch://x", "--storage 'nosuch://x': cannot open it"),
        ("--loss taylor --storage sqlite:////nonexistent/dir/s.db", "cannot open it"),
        ("--loss spherical --loss-opt epz=1", "unknown option(s) epz for loss 'spherical'"),
        ("--loss taylor --lr 0.1", "nothing to tune for 'taylor': the search space is empty"),
        ("--loss spherical --lr 0.1 --loss-opt eps=0.1", "the search space is empty"),
        ("--loss taylor --trials 0", "--trials must be >= 1, got 0"),
        ("--loss taylor --resume", "unrecognized arguments: --resume"),
    ],
)
def test_bad_tune_command_lines_end_with_one_message(
    args: str, message: str, train_only: Path, tmp_path: Path
) -> None:
    trials = [] if "--trials" in args else ["--trials", "1"]
    result = run_cli(
        "tune", *MNIST_FAST, *args.split(), *trials, "--epochs", "1",
        "--data-dir", str(train_only), "--out", str(tmp_path), "--tuned-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "mnist-cpu.json").exists()


def test_a_loss_that_diverges_everywhere_is_recorded_as_such(
    train_only: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Squared error searched around a learning rate far too large (1e4: from 1e3 to 1e5, where
    # it overflows in the first epoch, as test_diverged_run_stops_and_is_reported shows).
    original = tune_module.profile_settings
    monkeypatch.setattr(tune_module, "profile_settings", lambda c: original(c).replace(lr=1e4))
    config = RunConfig(
        task="mnist", loss="mse", out=str(tmp_path), data_dir=str(train_only), epochs=1,
        quiet=True, model_options={"width": 4, "features": 16}, tuned_dir=str(tmp_path / "t"),
    )  # fmt: skip
    entry = tune_module.tune(config, trials=2)
    assert entry["diverged_everywhere"] and entry["trials"]["diverged"] == 2
    assert entry["value"] is not None and math.isfinite(entry["value"])  # its best finite trial
    assert 1e3 <= entry["lr"] <= 1e5
    saved = json.loads((tmp_path / "t/mnist-cpu.json").read_text())["losses"]["mse"]
    assert saved["diverged_everywhere"] is True
    table = (tmp_path / "tune/mnist-cpu/tuning.md").read_text()
    note = f"diverged at every setting tried; best finite trial: {entry['trial']} |"
    assert "| mse |" in table and note in table


def test_run_options_round_trip_through_compare(tmp_path: Path) -> None:
    # compare hands each run its options on a command line derived from RunConfig's fields:
    # every option of compare comes back as it was.
    config = RunConfig(
        task="text", loss="spherical", loss_options={"eps": 0.1}, seed=2, profile="paper",
        output="factored", out="o", data_dir="d", device="cpu", epochs=3, batch_size=8, lr=0.5,
        head_lr=0.25, clip=0.0, train_limit=100, vocab_size=50, model_options={"hidden": 16},
        dtype="float64", tuned_dir="t", ignore_tuned=True, quiet=True, resume=True,
    )  # fmt: skip
    parser = argparse.ArgumentParser()
    add_run_options(parser, "train")
    per_run = ["--loss", "spherical", "--seed", "2", "--resume"]
    args = parser.parse_args([*passthrough(config), *per_run])
    assert config_from_args(args) == config


def test_a_best_learning_rate_at_the_edge_of_the_range_is_flagged() -> None:
    import optuna

    span = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)

    def trial(lr: float) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(params={"lr": lr}, distributions={"lr": span}, value=0.1)

    assert tune_module._at_edge(trial(1.5e-4)) == "low"
    assert tune_module._at_edge(trial(0.7)) == "high"
    assert tune_module._at_edge(trial(1e-2)) is None
    assert tune_module._at_edge(None) is None
