"""The experiment suite's ``--output linear`` head and ``--optimizer`` choice."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_experiments import (  # (and its autouse fixture: no shipped tuned settings)
    no_tuned_settings,  # noqa: F401
    run_cli,
    run_one_and_two_processes,
    text_dir,  # noqa: F401
)

from spherical_losses.experiments import cli
from spherical_losses.experiments.options import (
    RunConfig,
    RunError,
    add_run_options,
    config_from_args,
    passthrough,
)
from spherical_losses.experiments.report import write_report
from spherical_losses.experiments.runs import check_same_run, run_record
from spherical_losses.experiments.train import train
from spherical_losses.experiments.tuned import write_entry

TEXT_FAST = ["--task", "text", "--batch-size", "4", "--model-opt", "hidden=16", "--quiet"]


def _metrics(folder: Path) -> list[dict[str, float]]:
    """metrics.csv, without the timings."""
    with (folder / "metrics.csv").open() as f:
        return [
            {k: float(v) for k, v in row.items() if not k.startswith("train_") or k == "train_loss"}
            for row in csv.DictReader(f)
        ]


@pytest.mark.parametrize("loss", ["taylor", "z_loss"])
def test_linear_output_trains_like_the_dense_one_under_adamw(
    text_dir: Path,  # noqa: F811
    tmp_path: Path,
    loss: str,
) -> None:
    # float64, the same seed: the dense layer and the loss from WᵀW get the same gradient, so
    # AdamW (decoupled weight decay on), the profile's clipping of the whole network (output
    # layer included) and its dropout (the same random stream) give the same curve.
    curves, weights = {}, {}
    for output in ("dense", "linear"):
        config = RunConfig(
            task="text", loss=loss, output=output, optimizer="adamw", lr=0.01, weight_decay=0.1,
            out=str(tmp_path), data_dir=str(text_dir), epochs=3, batch_size=4, dtype="float64",
            quiet=True, model_options={"hidden": 16, "dropout": 0.2},
        )  # fmt: skip
        train(config)
        folder = tmp_path / "text" / f"{loss}-{output}-adamw".replace("-dense", "") / "seed-0"
        curves[output] = _metrics(folder)
        net = torch.load(folder / "checkpoint.pt", weights_only=True)["net"]
        weights[output] = net["head.weight" if output == "dense" else "head.linear.weight"]
    dense, linear = curves["dense"], curves["linear"]
    assert len(dense) == len(linear) == 3
    assert set(dense[0]) == set(linear[0])
    # (z_loss defines no probabilities: no perplexity, ranked by the logits)
    assert ("valid_perplexity" in dense[0]) == (loss == "taylor")
    for a, b in zip(dense, linear, strict=True):
        for name in a:
            assert math.isclose(a[name], b[name], rel_tol=1e-9, abs_tol=1e-12), (name, a, b)
    torch.testing.assert_close(weights["linear"], weights["dense"], rtol=1e-9, atol=1e-12)
    assert dense[-1]["train_loss"] < dense[0]["train_loss"]  # (it trained)


def test_new_options_are_recorded(text_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    common = [*TEXT_FAST, "--loss", "taylor", "--epochs", "1", "--data-dir", str(text_dir)]
    out = ["--out", str(tmp_path)]
    args = ["--output", "linear", "--optimizer", "adamw", "--weight-decay", "0.01"]
    assert cli.main(["train", *common, *out, *args]) == 0
    folder = tmp_path / "text" / "taylor-linear-adamw" / "seed-0"
    config = json.loads((folder / "config.json").read_text())
    assert config["output"] == "linear" and config["optimizer"] == "adamw"
    settings = config["settings"]
    # AdamW's own learning rate, no momentum; the weight decay given
    assert (settings["lr"], settings["momentum"], settings["weight_decay"]) == (1e-3, 0.0, 0.01)
    assert config["sources"]["lr"] == config["sources"]["momentum"] == "--optimizer adamw"
    assert config["sources"]["weight_decay"] == "command line"
    final = json.loads((folder / "final.json").read_text())
    assert final["optimizer"] == "adamw" and "valid_perplexity" in final["metrics"]
    # The default: SGD with the profile's settings, in the run directory it always had.
    assert cli.main(["train", *common, *out]) == 0
    config = json.loads((tmp_path / "text" / "taylor" / "seed-0" / "config.json").read_text())
    assert config["optimizer"] == "sgd" and config["sources"]["lr"] == "profile cpu"
    assert config["settings"]["lr"] == 20.0 and config["settings"]["weight_decay"] == 0.0


def test_a_run_made_before_the_optimizer_option_is_the_sgd_run(
    text_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    common = [*TEXT_FAST, "--epochs", "1", "--data-dir", str(text_dir), "--out", str(tmp_path)]
    assert cli.main(["train", *common, "--loss", "taylor"]) == 0
    folder = tmp_path / "text" / "taylor" / "seed-0"
    config = json.loads((folder / "config.json").read_text())
    del config["optimizer"], config["weight_decay"]  # as an older version wrote it
    (folder / "config.json").write_text(json.dumps(config))
    kept = (folder / "final.json").read_text()
    # resume and compare count it as the SGD run it was ...
    assert cli.main(["train", *common, "--loss", "taylor", "--resume"]) == 0
    result = run_cli("compare", *common, "--losses", "taylor", "--seeds", "1")
    assert result.returncode == 0, result.stderr
    assert "done already" in result.stdout and (folder / "final.json").read_text() == kept
    # ... and not as an AdamW run
    adamw = RunConfig(
        task="text", loss="taylor", optimizer="adamw", data_dir=str(text_dir), out=str(tmp_path)
    )
    with pytest.raises(RunError, match="optimizer: 'sgd' there, 'adamw' now"):
        check_same_run(folder, run_record(adamw))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            "--loss log_softmax --output linear",
            "--output linear needs a spherical loss; log_softmax is not spherical",
        ),
        (
            "--loss taylor --output factored --optimizer adamw",
            "--output factored trains the output layer with its own plain SGD (FactoredSGD), "
            "not --optimizer adamw; use --output linear",
        ),
        ("--loss taylor --optimizer adam", "invalid choice: 'adam'"),
        (
            "--loss taylor --optimizer adamw --model-opt sparse=1",
            "--optimizer adamw cannot train a sparse embedding",
        ),
        ("--loss taylor --weight-decay -1", "--weight-decay must be >= 0, got -1.0"),
    ],
)
def test_bad_combinations_end_with_one_message(args: str, message: str, tmp_path: Path) -> None:
    # (the data folder does not exist: every check runs before any data is read)
    for command in ("train", "compare"):
        argv = args.replace("--loss ", "--losses ") if command == "compare" else args
        result = run_cli(command, "--task", "ptb", *argv.split(), "--out", str(tmp_path))
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
        assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_optimizer_in_a_config_is_refused() -> None:
    config = RunConfig(task="ptb", loss="taylor", optimizer="lbfgs")
    with pytest.raises(RunError, match="--optimizer must be one of 'sgd', 'adamw', got 'lbfgs'"):
        config.settings()


def test_adamw_reads_its_own_tuned_entry(tmp_path: Path) -> None:
    # A learning rate tuned for SGD is no AdamW learning rate: each has its own entry.
    write_entry("ptb", "cpu", "taylor", {"lr": 7.0}, tmp_path)
    config = RunConfig(task="ptb", loss="taylor", tuned_dir=str(tmp_path))
    assert config.settings().lr == 7.0
    adamw = RunConfig(task="ptb", loss="taylor", optimizer="adamw", tuned_dir=str(tmp_path))
    assert adamw.settings().lr == 1e-3
    write_entry("ptb", "cpu", "taylor-linear-adamw", {"lr": 0.004}, tmp_path)
    linear = RunConfig(
        task="ptb", loss="taylor", output="linear", optimizer="adamw", tuned_dir=str(tmp_path)
    )
    resolved = linear.resolve()
    assert resolved.settings.lr == 0.004 and resolved.sources["lr"].startswith("tuned")


def test_new_options_round_trip_through_compare() -> None:
    config = RunConfig(
        task="text", loss="taylor", output="linear", optimizer="adamw", weight_decay=0.05,
        seed=1, data_dir="d",
    )  # fmt: skip
    parser = argparse.ArgumentParser()
    add_run_options(parser, "train")
    args = parser.parse_args([*passthrough(config), "--loss", "taylor", "--seed", "1"])
    assert config_from_args(args) == config


def test_torchrun_linear_output_matches_one_process(
    text_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The linear head's layer is in the network but not applied in its forward: under DDP its
    # gradient (from the loss on the features) is averaged with the body's all the same.
    args = [
        "train", *TEXT_FAST, "--loss", "taylor", "--output", "linear", "--optimizer", "adamw",
        "--lr", "0.01", "--epochs", "2", "--dtype", "float64", "--model-opt", "dropout=0",
        "--data-dir", str(text_dir),
    ]  # fmt: skip
    run_one_and_two_processes(args, tmp_path)
    run = "text/taylor-linear-adamw/seed-0"
    a = torch.load(tmp_path / "one" / run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / run / "checkpoint.pt", weights_only=True)
    assert "head.linear.weight" in a["net"]
    for name, value in a["net"].items():
        torch.testing.assert_close(b["net"][name], value, rtol=1e-9, atol=1e-12)


def test_report_tells_the_optimizers_apart(tmp_path: Path) -> None:
    for optimizer, error in ((None, 2.0), ("sgd", 4.0), ("adamw", 1.0)):
        folder = tmp_path / "mnist" / f"taylor-{optimizer}" / "seed-0"
        folder.mkdir(parents=True)
        final = {
            "task": "mnist", "loss": "taylor", "loss_options": {}, "loss_spec": "taylor",
            "output": "dense", "seed": 0, "profile": "cpu", "epochs": 1,
            "metrics": {"test_error": error},
        }  # fmt: skip
        if optimizer is not None:  # (a run made before --optimizer has none: SGD)
            final["optimizer"] = optimizer
        (folder / "final.json").write_text(json.dumps(final))
        (folder / "metrics.csv").write_text(f"epoch,test_error\n1,{error}\n")
    text = write_report(tmp_path / "mnist")[0].read_text()
    assert "| taylor | dense | cpu | 2 | 0 | 1 | 3.00 ± 1.41 |" in text
    assert "| taylor | dense, adamw | cpu | 1 | 0 | 1 | 1.00 |" in text
