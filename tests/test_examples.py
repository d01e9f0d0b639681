"""Every example runs, and prints what the guide's version prints."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example():
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_custom_callback(example, capsys):
    example("custom_callback").main()
    out = capsys.readouterr().out.splitlines()
    # The guide's printed order, hook by hook, for fit then evaluate/predict.
    assert out[:3] == [
        "Starting training; got log keys: []",
        "Start epoch 0 of training; got log keys: []",
        "...Training: start of batch 0; got log keys: []",
    ]
    assert "...Training: end of batch 3; got log keys: ['loss', " \
           "'mean_absolute_error']" in out
    assert ("End epoch 0 of training; got log keys: ['loss', "
            "'mean_absolute_error', 'val_loss', "
            "'val_mean_absolute_error']") in out
    assert out[-1] == "Stop predicting; got log keys: []"
    assert out.count("Start testing; got log keys: []") == 2


def test_loss_and_error_printing(example, capsys):
    example("loss_and_error_printing").main()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("Up to batch 0, the average loss is")
    assert sum(line.startswith("The average loss for epoch") for line in out) == 2
    assert len(out) == 8 + 1 + 8 + 1 + 8


def test_control_stays_synchronous(example, capsys):
    stopper, model = example("control_stays_synchronous").main(epochs=10)
    out = capsys.readouterr().out
    assert stopper.stopped_epoch > 0 and "early stopping" in out
    assert "Epoch 3: Learning rate is 0.05." in out
    assert "Epoch 6: Learning rate is 0.01." in out
    assert float(model.optimizer.learning_rate) == pytest.approx(0.005)


def test_gradient_tape_loop(example, capsys, tmp_path):
    history, directory = example("gradient_tape_loop").main(
        epochs=3, directory=str(tmp_path))
    out = capsys.readouterr().out
    assert len(history["loss"]) == 3
    assert "Batch 1: Loss = " in out and "Epoch 2: Loss = " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch01.weights.h5", "epoch02.weights.h5", "epoch03.weights.h5"]


def test_prediction_sanity_check(example, capsys):
    check = example("prediction_sanity_check").main(epochs=3, samples=512)
    assert [epoch for epoch, _ in check.reports] == [0, 1, 2]
    assert check.reports[0][1] == 0
    assert "Epoch 2:" in capsys.readouterr().out


def test_checkpoint_often(example, capsys, tmp_path):
    same, stats = example("checkpoint_often").main(
        ["--epochs", "2", "--steps", "10", "--width", "64",
         "--directory", str(tmp_path)])
    assert same
    assert stats.callbacks["ModelCheckpoint"].worker_time["save"].count == 4
    assert "every checkpoint equal to plain Keras' and loadable: True" in (
        capsys.readouterr().out)


def test_process_custom_layer_as_a_script(tmp_path):
    """Run as a script, so that its custom layer lives in `__main__` and
    must reach the worker processes by value."""
    import subprocess

    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "process_custom_layer.py"),
         "--epochs", "2", "--save-every", "16", "--directory", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 checkpoints in" in result.stdout
    assert "the last loads: ScaledDense" in result.stdout
    assert "sanity-checked epochs: [0, 1]" in result.stdout
    assert "predictions finite" in result.stdout


def test_measure_throughput(example, capsys):
    plain, ours, stats = example("measure_throughput").main(["--epochs", "2"])
    assert plain > 0 and ours > 0
    assert set(stats.callbacks) == {"ModelCheckpoint", "CSVLogger"}
    assert stats.callbacks["ModelCheckpoint"].executor == "process"
    out = capsys.readouterr().out
    assert "with asynccb:" in out and "the training thread paid" in out


def test_preemption(example, capsys, tmp_path):
    result = example("preemption").main(
        ["--due", "6", "--width", "256", "--directory", str(tmp_path)])
    assert result["status"] == -15  # SIGTERM, as plain Keras ends.
    assert set(result["due"]) <= set(result["on_disk"])
    assert len(result["due"]) >= 6
    assert "lost: none" in capsys.readouterr().out


def test_multi_worker(example, capsys, tmp_path):
    chief, other = example("multi_worker").main(
        ["--epochs", "3", "--directory", str(tmp_path)])
    assert chief["files"][-1] == "log.csv" and chief["snapshots"] > 0
    assert other["files"] == [] and other["snapshots"] == 0
    assert chief["stopped_epoch"] == other["stopped_epoch"]
    assert "worker 1: " in capsys.readouterr().out
