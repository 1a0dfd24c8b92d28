"""The experiment suite end to end: command line, run directories, resume, reports, torchrun."""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import spherical_losses as sl
from spherical_losses.experiments import cli
from spherical_losses.experiments.heads import DenseHead, Net
from spherical_losses.experiments.options import RunConfig
from spherical_losses.experiments.report import write_report
from spherical_losses.experiments.tasks import LanguageModel, Settings
from spherical_losses.experiments.train import evaluate, perplexity, train
from spherical_losses.experiments.tuned import TUNED_DIR_ENV_VAR
from spherical_losses.family import get_member

# The MNIST look-alike files below are small, so the loader warns that they are not the
# official MNIST (tests/test_data.py checks that warning).
pytestmark = pytest.mark.filterwarnings("ignore:.*are not the official MNIST:UserWarning")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# No tuned settings (a folder that does not exist): the runs here use the profiles' values,
# whatever tuned files the package ships.
NO_TUNED = str(Path(tempfile.gettempdir()) / "spherical-losses-tests-no-tuned-settings")
ENV = {
    **os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", TUNED_DIR_ENV_VAR: NO_TUNED,
}  # fmt: skip


@pytest.fixture(autouse=True)
def no_tuned_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TUNED_DIR_ENV_VAR, NO_TUNED)


def _idx(magic: int, array: np.ndarray) -> bytes:
    return (
        struct.pack(">I", magic)
        + b"".join(struct.pack(">I", d) for d in array.shape)
        + array.tobytes()
    )


def make_mnist(root: Path, n_train: int = 512, n_test: int = 128) -> Path:
    """A learnable MNIST look-alike: class k lights up a 4×4 square at a class-specific place."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            r, c = 2 + 8 * (k // 3), 2 + 8 * (k % 3)
            images[i, r : r + 4, c : c + 4] = 255
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(0x803, images)))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(0x801, labels))
    return root


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(40)]
    for name, lines in (("train", 300), ("valid", 40), ("test", 40)):
        text = "\n".join(
            " ".join(words[(j * 3 + k) % 40] for k in range(int(rng.integers(3, 12))))
            for j in range(lines)
        )
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spherical_losses", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=600,
    )


MNIST_FAST = ["--task", "mnist", "--model-opt", "width=4", "--model-opt", "features=16", "--quiet"]


def test_train_writes_a_complete_run_directory(mnist_dir: Path, tmp_path: Path) -> None:
    code = cli.main(
        [
            "train", *MNIST_FAST, "--loss", "spherical", "--loss-opt", "eps=0.1", "--epochs", "2",
            "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--seed", "3",
        ]
    )  # fmt: skip
    assert code == 0
    folder = tmp_path / "mnist" / "spherical_eps=0.1" / "seed-3"
    assert sorted(p.name for p in folder.iterdir()) == [
        "checkpoint.pt", "config.json", "final.json", "metrics.csv",
    ]  # fmt: skip
    final = json.loads((folder / "final.json").read_text())
    assert final["loss_spec"] == "spherical(eps=0.1)" and final["seed"] == 3
    assert 0 <= final["metrics"]["test_error"] <= 100
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["loss_options"] == {"eps": 0.1} and config["settings"]["epochs"] == 2
    # the same run again is refused, not overwritten
    again = ["train", *MNIST_FAST, "--loss", "spherical", "--loss-opt", "eps=0.1", "--epochs", "2"]
    assert (
        cli.main([*again, "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--seed", "3"]) == 2
    )


def test_learns_the_fixture(mnist_dir: Path, tmp_path: Path) -> None:
    config = RunConfig(
        task="mnist", loss="taylor", out=str(tmp_path), data_dir=str(mnist_dir), epochs=3,
        quiet=True, model_options={"width": 8, "features": 32},
    )  # fmt: skip
    assert train(config)["metrics"]["test_error"] < 20.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--task mnst --loss taylor", "invalid choice: 'mnst'"),
        ("--task mnist --loss tayl", "unknown loss 'tayl'; expected one of"),
        ("--task mnist --loss spherical --loss-opt eps=-1", "eps must be a finite number > 0"),
        ("--task mnist --loss spherical --loss-opt eps", "--loss-opt takes key=value"),
        ("--task mnist --loss taylor --loss-opt order=3", "even integer"),
        ("--task mnist --loss taylor --epochs 0", "--epochs must be >= 1, got 0"),
        ("--task mnist --loss taylor --model-opt wdth=3", "unknown model option(s) wdth"),
        ("--task mnist --loss taylor --data-dir /nonexistent", "/nonexistent/mnist/train-images"),
        ("--task mnist --loss taylor --profile gpu", "invalid choice: 'gpu'"),
        ("--task mnist --loss taylor --clip -1", "--clip must be >= 0 (0: no clipping), got -1"),
        ("--task mnist --loss taylor --train-limit 0", "--train-limit must be >= 1, got 0"),
        ("--task mnist --loss taylor --head-lr 0", "--head-lr must be > 0, got 0"),
        ("--task mnist --loss taylor --model-opt width=abc", "model option width must be a number"),
        ("--task mnist --loss spherical --loss-opt eps=abc", "option eps of loss 'spherical' must"),
        ("--task mnist --loss spherical --loss-opt eps=none", "bad option value for loss"),
        pytest.param(
            "--task mnist --loss taylor --device cuda",
            "--device cuda: not available here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"),
        ),
    ],
)
def test_bad_command_lines_end_with_one_message(args: str, message: str, tmp_path: Path) -> None:
    result = run_cli("train", *args.split(), "--out", str(tmp_path), "--quiet")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_killed_run_resumes_to_the_same_metrics(mnist_dir: Path, tmp_path: Path) -> None:
    # Epochs of about 0.15 s here: enough of them that the kill, within 20 ms of the first
    # checkpoint, comes long before the end even on a loaded machine.
    epochs = 12
    args = [
        "train", *MNIST_FAST, "--loss", "z_loss", "--epochs", str(epochs),
        "--data-dir", str(mnist_dir),
    ]  # fmt: skip
    # the reference: never interrupted
    assert run_cli(*args, "--out", str(tmp_path / "a")).returncode == 0
    reference = json.loads((tmp_path / "a/mnist/z_loss/seed-0/final.json").read_text())

    folder = tmp_path / "b" / "mnist" / "z_loss" / "seed-0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spherical_losses", *args, "--out", str(tmp_path / "b")], env=ENV
    )
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint.pt").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "final.json").exists(), "killed too late: the run had finished"
    epochs_done = len((folder / "metrics.csv").read_text().splitlines()) - 1
    assert 1 <= epochs_done < epochs

    # without --resume the interrupted run is not overwritten
    refused = run_cli(*args, "--out", str(tmp_path / "b"))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert run_cli(*args, "--out", str(tmp_path / "b"), "--resume").returncode == 0
    resumed = json.loads((folder / "final.json").read_text())
    assert resumed["metrics"] == reference["metrics"]
    ref_rows = (tmp_path / "a/mnist/z_loss/seed-0/metrics.csv").read_text().splitlines()
    got_rows = (folder / "metrics.csv").read_text().splitlines()
    assert [_without_timings(r) for r in got_rows] == [_without_timings(r) for r in ref_rows]


def test_resume_and_compare_refuse_a_run_made_with_other_settings(
    mnist_dir: Path, tmp_path: Path
) -> None:
    common = [*MNIST_FAST, "--data-dir", str(mnist_dir), "--out", str(tmp_path)]
    assert cli.main(["train", *common, "--loss", "taylor", "--epochs", "1"]) == 0
    final = tmp_path / "mnist/taylor/seed-0/final.json"
    kept = final.read_text()
    # A finished run, "resumed" for more epochs or another learning rate: not that run.
    result = run_cli("train", *common, "--loss", "taylor", "--epochs", "2", "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds a run made with other settings (epochs: 1 there, 2 now)" in result.stderr
    # compare would have counted it as done, under the new settings' row
    result = run_cli(
        "compare", *common, "--losses", "taylor", "--seeds", "1", "--epochs", "1", "--lr", "0.02"
    )
    assert result.returncode == 2 and "lr: 0.05 there, 0.02 now" in result.stderr
    assert final.read_text() == kept
    # The same settings (the profile's epochs given explicitly or not) continue it.
    assert cli.main(["train", *common, "--loss", "taylor", "--epochs", "1", "--resume"]) == 0


def test_unreadable_checkpoint_ends_with_one_message(mnist_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mnist/taylor/seed-0"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"\x80\x02 not a checkpoint")
    result = run_cli(
        "train", *MNIST_FAST, "--loss", "taylor", "--data-dir", str(mnist_dir), "--out",
        str(tmp_path), "--resume",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot read {folder / 'checkpoint.pt'}" in result.stderr


class _Payload:
    """A pickled object that, when unpickled, creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_is_refused_without_running_code(
    mnist_dir: Path, tmp_path: Path
) -> None:
    common = [*MNIST_FAST, "--loss", "taylor", "--data-dir", str(mnist_dir), "--out", str(tmp_path)]
    assert cli.main(["train", *common, "--epochs", "2"]) == 0
    folder = tmp_path / "mnist/taylor/seed-0"
    (folder / "final.json").unlink()  # as if interrupted after its last checkpoint
    # The checkpoint is plain data: it reads with weights_only=True.
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    state["history"][-1]["note"] = _Payload(marker)
    torch.save(state, folder / "checkpoint.pt")
    result = run_cli("train", *common, "--epochs", "2", "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot read {folder / 'checkpoint.pt'}: it holds a pickled object" in result.stderr
    assert "refused without running it" in result.stderr
    assert not marker.exists() and not (folder / "final.json").exists()
    # (the payload is live: an unchecked load would have run it)
    torch.load(folder / "checkpoint.pt", weights_only=False)
    assert marker.exists()


def test_perplexity_of_a_diverged_model_is_infinite() -> None:
    assert perplexity(2.0) == math.exp(2.0)
    assert perplexity(1e4) == math.inf  # (math.exp raises OverflowError there)
    assert math.isnan(perplexity(math.nan))


def _without_timings(row: str) -> list[str]:
    """A metrics.csv row without its train_seconds and train_per_second columns."""
    return [c for i, c in enumerate(row.split(",")) if i not in (3, 4)]


def test_compare_skips_finished_resumes_interrupted_and_reports(
    mnist_dir: Path, tmp_path: Path
) -> None:
    common = [*MNIST_FAST, "--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path)]
    assert cli.main(["train", *common, "--loss", "taylor", "--seed", "1"]) == 0
    finished = tmp_path / "mnist/taylor/seed-1/final.json"
    stamp = finished.stat().st_mtime_ns
    result = run_cli("compare", *common, "--losses", "log_softmax,taylor", "--seeds", "2")
    assert result.returncode == 0, result.stderr
    assert "done already" in result.stdout and finished.stat().st_mtime_ns == stamp
    for loss in ("log_softmax", "taylor"):
        for seed in (0, 1):
            assert (tmp_path / f"mnist/{loss}/seed-{seed}/final.json").exists()
    report = (tmp_path / "mnist" / "report.md").read_text()
    assert "| log_softmax | dense | cpu | 2 | 0 | 1 |" in report and "0.812" in report
    assert " ± " in report
    for name in ("report.csv", "curves.png", "final.png"):
        assert (tmp_path / "mnist" / name).stat().st_size > 0


def test_compare_reports_a_crashed_run_and_keeps_the_others(
    mnist_dir: Path, tmp_path: Path
) -> None:
    common = [*MNIST_FAST, "--epochs", "1", "--data-dir", str(mnist_dir), "--out", str(tmp_path)]
    assert cli.main(["train", *common, "--loss", "mse", "--seed", "0"]) == 0
    # a corrupt checkpoint makes the other run crash when compare resumes it
    bad = tmp_path / "mnist/taylor/seed-0"
    bad.mkdir(parents=True)
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    result = run_cli("compare", *common, "--losses", "mse,taylor", "--seeds", "1")
    assert result.returncode == 1 and "failed runs" in result.stderr
    assert json.loads((tmp_path / "mnist/mse/seed-0/final.json").read_text())["loss"] == "mse"


def test_diverged_run_stops_and_is_reported(mnist_dir: Path, tmp_path: Path) -> None:
    # Squared error at a learning rate far too large: the loss overflows in the first epoch.
    common = [*MNIST_FAST, "--loss", "mse", "--epochs", "3", "--lr", "1000", "--data-dir"]
    result = run_cli("train", *common, str(mnist_dir), "--out", str(tmp_path))
    assert result.returncode == 0
    assert "training diverged" in result.stderr and "epoch 1" in result.stderr
    folder = tmp_path / "mnist" / "mse" / "seed-0"
    final = json.loads((folder / "final.json").read_text())
    assert final["diverged_at_epoch"] == 1 and final["epochs_run"] == 1 and final["epochs"] == 3
    assert len((folder / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 1
    text, _ = write_report(tmp_path / "mnist")
    assert "| mse | dense | cpu | 1 | 1 | 3 |" in text.read_text()
    # a second diverged seed: the mean of two nan losses is nan, not a crash
    result = run_cli("train", *common, str(mnist_dir), "--out", str(tmp_path), "--seed", "1")
    assert result.returncode == 0
    text, _ = write_report(tmp_path / "mnist")
    assert "| mse | dense | cpu | 2 | 2 | 3 |" in text.read_text()
    assert "| nan |" in text.read_text()


def test_factored_output_divergence_stops_the_run(text_dir: Path, tmp_path: Path) -> None:
    # The factored head refuses a non-finite update (NonFiniteUpdateError): the run stops at
    # that epoch like a dense one whose loss is not finite, with no traceback.
    result = run_cli(
        "train", "--task", "text", "--data-dir", str(text_dir), "--out", str(tmp_path),
        "--loss", "mse", "--output", "factored", "--lr", "1e6", "--epochs", "3",
        "--batch-size", "4", "--model-opt", "hidden=16", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    final = json.loads((tmp_path / "text" / "mse-factored" / "seed-0" / "final.json").read_text())
    assert final["diverged_at_epoch"] == 1 and final["epochs_run"] == 1


def test_sync_free_factored_divergence_is_reported_by_the_epoch(
    text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a GPU, where the step reads nothing back: a non-finite update is skipped on the
    # device and reported by the deferred check, which the epoch runs at its end at the latest
    # (its steps are fewer than check_every).
    init = sl.FactoredSGD.__init__

    def sync_free(self: sl.FactoredSGD, *args: object, **kwargs: object) -> None:
        init(self, *args, **{**kwargs, "sync_free": True, "check_every": 0})  # type: ignore[arg-type]

    monkeypatch.setattr(sl.FactoredSGD, "__init__", sync_free)
    code = cli.main([
        "train", "--task", "text", "--data-dir", str(text_dir), "--out", str(tmp_path),
        "--loss", "taylor", "--output", "factored", "--lr", "1e30", "--epochs", "2",
        "--batch-size", "4", "--model-opt", "hidden=16", "--quiet",
    ])  # fmt: skip
    assert code == 0
    final = json.loads((tmp_path / "text/taylor-factored/seed-0/final.json").read_text())
    assert final["diverged_at_epoch"] == 1 and final["epochs_run"] == 1


def _write_finished(root: Path, loss: str, errors: list[float]) -> None:
    for seed, err in enumerate(errors):
        folder = root / "mnist" / loss / f"seed-{seed}"
        folder.mkdir(parents=True)
        final = {
            "task": "mnist", "loss": loss, "loss_options": {}, "loss_spec": loss,
            "output": "dense", "seed": seed, "profile": "cpu", "epochs": 2,
            "metrics": {"test_error": err, "test_loss": 0.1},
        }  # fmt: skip
        (folder / "final.json").write_text(json.dumps(final))
        (folder / "metrics.csv").write_text(f"epoch,test_error\n1,{err + 1}\n2,{err}\n")


def test_report_names_an_unreadable_final_json(tmp_path: Path) -> None:
    bad = tmp_path / "mnist/taylor/seed-0"
    bad.mkdir(parents=True)
    (bad / "final.json").write_text("{\n")
    result = run_cli("report", str(tmp_path / "mnist"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{bad / 'final.json'} is not valid JSON" in result.stderr


def test_report_mean_and_std(tmp_path: Path) -> None:
    _write_finished(tmp_path, "taylor", [1.0, 2.0, 4.0])
    md, csv = write_report(tmp_path / "mnist")
    text = md.read_text()
    assert f"| taylor | dense | cpu | 3 | 0 | 2 | 2.33 ± {np.std([1, 2, 4], ddof=1):.2f} |" in text
    assert "0.785" in text  # the paper's figure beside ours
    assert csv.read_text().splitlines()[1].startswith("mnist,cpu,taylor,dense,3,0,2,")
    assert text.rstrip().splitlines()[4].endswith("| 0.785 | — |")  # no log-softmax to compare
    with pytest.raises(ValueError, match="no finished runs"):
        write_report(tmp_path / "empty")


def test_report_compares_each_loss_with_log_softmax(tmp_path: Path) -> None:
    _write_finished(tmp_path, "log_softmax", [1.0, 2.0, 3.0])
    _write_finished(tmp_path, "taylor", [2.0, 3.0, 4.0])
    _write_finished(tmp_path, "z_loss", [5.0])  # one seed: no comparison
    md, csv = write_report(tmp_path / "mnist")
    # Welch: difference 1, standard error sqrt(1/3 + 1/3), df = 4.
    t = 1.0 / math.sqrt(2.0 / 3.0)
    lines = {line.split(" | ")[0]: line for line in md.read_text().splitlines()}
    assert lines["| taylor"].endswith(f"| +1.00 (t = {t:.2f}, df = 4.0) |")
    assert lines["| log_softmax"].endswith("| — |") and lines["| z_loss"].endswith("| — |")
    rows = {row.split(",")[2]: row.split(",") for row in csv.read_text().splitlines()[1:]}
    assert float(rows["taylor"][-2]) == pytest.approx(t) and float(rows["taylor"][-1]) == 4.0


@pytest.mark.parametrize("loss", ["log_softmax", "taylor", "spherical", "softmax_bound", "z_loss"])
def test_language_model_metrics(text_dir: Path, tmp_path: Path, loss: str) -> None:
    config = RunConfig(
        task="text", loss=loss, out=str(tmp_path), data_dir=str(text_dir), epochs=1, quiet=True,
        batch_size=4, model_options={"hidden": 16, "dropout": 0.0},
    )  # fmt: skip
    metrics = train(config)["metrics"]
    assert 0 <= metrics["test_top10_error"] <= metrics["test_error"] <= 100
    # perplexity only under the model's own probabilities; none for the Z-loss
    assert ("test_perplexity" in metrics) == (loss != "z_loss")


def test_perplexity_is_exp_of_cross_entropy_and_uses_the_members_probabilities(
    text_dir: Path,
) -> None:
    from spherical_losses.experiments.data import load_text_corpus

    task = LanguageModel(load_text_corpus(text_dir), "text")
    settings = Settings(epochs=1, batch_size=4, lr=1.0, bptt=7, model={"hidden": 8})
    torch.manual_seed(0)
    net = Net(task.build_body(settings), torch.nn.Linear(8, task.num_classes), recurrent=True)
    ce = evaluate(
        task, net, DenseHead(get_member("log_softmax")), settings, "test", torch.device("cpu")
    )
    assert math.isclose(ce["test_perplexity"], math.exp(ce["test_loss"]), rel_tol=1e-6)
    taylor = evaluate(
        task, net, DenseHead(get_member("taylor")), settings, "test", torch.device("cpu")
    )
    # Taylor's loss is its own negative log-probability
    assert math.isclose(taylor["test_perplexity"], math.exp(taylor["test_loss"]), rel_tol=1e-6)
    assert taylor["test_error"] == ce["test_error"]  # same logits, same ranking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_and_two_processes(args: list[str], tmp_path: Path) -> None:
    """``args`` in one process into ``tmp_path/one``, then under torchrun with two processes
    (gloo) into ``tmp_path/two``."""
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "spherical_losses", *args, "--out", str(tmp_path / "two"),
        ],
        capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr


def test_torchrun_two_processes_match_one_process(mnist_dir: Path, tmp_path: Path) -> None:
    args = [
        "train", *MNIST_FAST, "--model-opt", "dropout=0", "--loss", "taylor", "--epochs", "2",
        "--batch-size", "32", "--dtype", "float64", "--data-dir", str(mnist_dir),
    ]  # fmt: skip
    run_one_and_two_processes(args, tmp_path)
    a = torch.load(tmp_path / "one/mnist/taylor/seed-0/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two/mnist/taylor/seed-0/checkpoint.pt", weights_only=True)
    assert (
        json.loads((tmp_path / "two/mnist/taylor/seed-0/final.json").read_text())["world_size"] == 2
    )
    moved = False
    for name, value in a["net"].items():
        torch.testing.assert_close(b["net"][name], value, rtol=1e-10, atol=1e-12)
        moved |= name.endswith("weight")
    assert moved


def test_torchrun_factored_output_matches_one_process(text_dir: Path, tmp_path: Path) -> None:
    # The factored layer under torchrun: each process trains on half of the streams, they
    # exchange their rows of each update and apply the same step; the body goes through DDP.
    args = [
        "train", "--task", "text", "--loss", "taylor", "--output", "factored", "--epochs", "2",
        "--batch-size", "4", "--clip", "0", "--dtype", "float64", "--model-opt", "hidden=16",
        "--model-opt", "dropout=0", "--data-dir", str(text_dir), "--quiet",
    ]  # fmt: skip
    run_one_and_two_processes(args, tmp_path)
    run = "text/taylor-factored/seed-0"
    a = torch.load(tmp_path / "one" / run / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / run / "checkpoint.pt", weights_only=True)
    for name, value in a["head"].items():
        if isinstance(value, torch.Tensor):  # (not the extra state)
            torch.testing.assert_close(b["head"][name], value, rtol=1e-9, atol=1e-12)
    for name, value in a["net"].items():
        torch.testing.assert_close(b["net"][name], value, rtol=1e-9, atol=1e-12)
    final_one = json.loads((tmp_path / "one" / run / "final.json").read_text())["metrics"]
    final_two = json.loads((tmp_path / "two" / run / "final.json").read_text())["metrics"]
    assert math.isclose(final_one["valid_perplexity"], final_two["valid_perplexity"], rel_tol=1e-9)


@pytest.mark.skipif(not (REAL_DATA / "mnist").exists(), reason="shared/data not present")
def test_smoke_run_on_real_mnist(tmp_path: Path) -> None:
    config = RunConfig(
        task="mnist", loss="taylor", out=str(tmp_path), data_dir=str(REAL_DATA), epochs=1,
        train_limit=6400, quiet=True, model_options={"width": 8, "features": 64},
    )  # fmt: skip
    assert train(config)["metrics"]["test_error"] < 15.0


def test_factored_output_trains_exactly_like_the_dense_one(text_dir: Path, tmp_path: Path) -> None:
    # Same seed, plain SGD for the output layer, no clipping: in float64 the validation
    # perplexity of dense and factored Taylor agree to rounding.
    finals = {}
    for output in ("dense", "factored"):
        config = RunConfig(
            task="text", loss="taylor", output=output, out=str(tmp_path), data_dir=str(text_dir),
            epochs=2, batch_size=4, clip=0.0, dtype="float64", quiet=True,
            model_options={"hidden": 16, "dropout": 0.0},
        )  # fmt: skip
        finals[output] = train(config)["metrics"]
    for name in ("valid_perplexity", "test_perplexity", "test_loss"):
        assert math.isclose(finals["dense"][name], finals["factored"][name], rel_tol=1e-9)
    assert finals["dense"]["test_error"] == finals["factored"]["test_error"]


def test_factored_output_needs_a_spherical_loss(text_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train", "--task", "text", "--data-dir", str(text_dir), "--out", str(tmp_path),
        "--loss", "log_softmax", "--output", "factored", "--quiet",
    )  # fmt: skip
    assert result.returncode == 2 and "needs a spherical loss" in result.stderr


def test_factored_output_refuses_momentum(mnist_dir: Path, tmp_path: Path) -> None:
    # The MNIST profile trains with momentum: the factored layer has no exact form for it, so
    # the run stops before training instead of silently using plain SGD for that layer.
    result = run_cli(
        "train", *MNIST_FAST, "--data-dir", str(mnist_dir), "--out", str(tmp_path),
        "--loss", "taylor", "--output", "factored",
    )  # fmt: skip
    assert result.returncode == 2 and "momentum" in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.rglob("checkpoint.pt"))


@pytest.mark.parametrize("loss", ["taylor", "spherical"])
def test_predictions_rank_by_the_members_probabilities(loss: str) -> None:
    # A large negative output is the most probable class under Taylor and spherical softmax.
    logits = torch.tensor([[-9.0, 1.0, 2.0], [0.5, -0.2, 0.1]])
    top = DenseHead(get_member(loss)).topk(logits, 1)[:, 0]
    probs = {"taylor": sl.taylor_softmax, "spherical": sl.spherical_softmax}[loss](logits)
    assert torch.equal(top, probs.argmax(dim=1))
    assert top[0] == 0 and logits[0].argmax() == 2
