"""Storage errors surface and leave nothing behind: a full disk, a
read-only directory, the directory removed mid-save. Each raises on the
training thread with the `OSError` as cause, keeps the previous file
intact and leaves no temporary file.

The full and read-only disks are real: a small tmpfs, mounted for the test
(root with CAP_SYS_ADMIN, as CI runs; skipped, saying why, elsewhere).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import threading

import keras
import numpy as np
import pytest
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like
from crossproc import Signal
from gated import gated_model, load_gated

from asynccb import AsyncCallback, AsyncCallbackError

pytestmark = pytest.mark.parametrize("executor", ["thread", "process"])


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs, mounted at `tmp_path / "disk"` for the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(directory) -> None:
    """Fills the file system of `directory` to the last byte."""
    with open(os.path.join(directory, "filler"), "wb") as filler:
        chunk = b"\0" * (1 << 16)
        try:
            while True:
                filler.write(chunk)
                filler.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # What the file system keeps back from a buffered write: the last
    # bytes, one at a time.
    with open(os.path.join(directory, "filler"), "ab", buffering=0) as tail:
        try:
            while tail.write(b"\0"):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


class AtEpoch(keras.callbacks.Callback):
    """Calls `action` at the start of epoch `epoch`, and records the
    weights at the end of every epoch."""

    def __init__(self, epoch, action):
        super().__init__()
        self.epoch, self.action = epoch, action
        self.weights: list[list[np.ndarray]] = []

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.action()

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights())


def _leftovers(directory) -> list[str]:
    return [name for name in os.listdir(directory) if "asynccb-tmp" in name]


def _fit_until_it_raises(model, directory, executor, at_epoch, action,
                         epochs=3):
    """Checkpoints `model.keras` every epoch; `action` at the start of
    `at_epoch`. Returns the error raised and the weights recorded."""
    checkpoint = AsyncCallback(keras.callbacks.ModelCheckpoint(
        os.path.join(directory, "model.keras")), executor=executor)

    def after_the_saves_queued():
        checkpoint.wait()  # The earlier saves are on disk first.
        action()

    recorder = AtEpoch(at_epoch, after_the_saves_queued)
    x, y = mnist_like(64)
    with pytest.raises(AsyncCallbackError) as caught:
        model.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
                  shuffle=False, callbacks=[recorder, checkpoint])
    return caught.value, recorder.weights


def _assert_holds(path, weights, load=keras.models.load_model) -> None:
    for got, want in zip(load(path).get_weights(), weights):
        assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("at_epoch", [0, 1], ids=["first save", "fast save"])
def test_a_full_disk(small_disk, executor, at_epoch):
    """At the first save (Keras' writer) or a later one (the fast path)."""
    error, weights = _fit_until_it_raises(
        make_model(), small_disk, executor, at_epoch,
        lambda: _fill(small_disk))
    cause = error.__cause__
    assert isinstance(cause, OSError), repr(cause)
    assert cause.errno == errno.ENOSPC, repr(cause)
    assert "model.save(" in str(error)
    assert _leftovers(small_disk) == []
    if at_epoch == 1:  # The previous checkpoint: intact, epoch 0's.
        _assert_holds(small_disk / "model.keras", weights[0])
    else:
        assert not (small_disk / "model.keras").exists()


def test_a_read_only_directory(small_disk, executor):
    def read_only():
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)],
                       check=True)

    try:
        error, weights = _fit_until_it_raises(
            make_model(), small_disk, executor, 1, read_only)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)],
                       check=True)
    cause = error.__cause__
    assert isinstance(cause, OSError) and cause.errno == errno.EROFS, (
        repr(cause))
    assert _leftovers(small_disk) == []
    _assert_holds(small_disk / "model.keras", weights[0])


def test_the_directory_removed_mid_save(tmp_path, executor):
    """The second save is caught mid-file (at a gate) while the directory
    is removed under it: the save fails with the file system's error, and
    nothing is left where the directory was."""
    started = Signal(tmp_path / "started.fifo")
    gate = Signal(tmp_path / "gate.fifo")
    directory = tmp_path / "ckpt"

    def remove_the_directory():
        if started.wait(JOIN_TIMEOUT_S) is not None:
            shutil.rmtree(directory)
        gate.set()

    remover = threading.Thread(target=remove_the_directory)
    remover.start()
    try:
        error, _ = _fit_until_it_raises(
            gated_model(gate.path, started=started.path, free=1),
            directory, executor, 0, lambda: None)
    finally:
        gate.set()
        remover.join(JOIN_TIMEOUT_S)
    cause = error.__cause__
    assert isinstance(cause, OSError), repr(cause)
    assert isinstance(cause, FileNotFoundError), repr(cause)
    # Nothing where the directory was but what the later saves wrote
    # (ModelCheckpoint makes a missing directory again, as in Keras).
    assert not directory.exists() or _leftovers(directory) == []
    if directory.exists() and (directory / "model.keras").exists():
        load_gated(directory / "model.keras")
