"""BackupAndRestore, offloaded as ModelCheckpoint is: its backups written by
a worker from a snapshot, its restore and cleanup inline, ordered after the
backups queued; a run killed mid-backup resumes from the last complete
backup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from artifacts import assert_same_checkpoints
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like
from crossproc import Signal, children_of, wait_for_exit
from gated import gated_model

from asynccb import AsyncCallback, AsyncCallbackList

TESTS = Path(__file__).resolve().parent


class InterruptAt(keras.callbacks.Callback):
    """Raises at the start of epoch `epoch`, as in Keras' own example."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("Interrupting!")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _interrupted_then_resumed(directory: Path, wrap, save_freq):
    """Keras' own scenario: a run interrupted in epoch 2, then the same
    callback resumes it at once (Keras called no end hook: asynccb's run
    watch may still be writing the last backups when the next run starts
    and restores). Returns the backup files at the end, the epochs the
    second run trained and its final weights."""
    x, y = mnist_like(96)
    backup = keras.callbacks.BackupAndRestore(
        str(directory), save_freq=save_freq, double_checkpoint=True,
        delete_checkpoint=False)
    callback = wrap(backup)
    model = make_model()
    with pytest.raises(RuntimeError, match="Interrupting"):
        model.fit(x, y, epochs=4, batch_size=16, verbose=0, shuffle=False,
                  callbacks=[callback, InterruptAt(2)])
    resumed = make_model(seed=7)  # Other weights: the restore must win.
    history = resumed.fit(x, y, epochs=4, batch_size=16, verbose=0,
                          shuffle=False, callbacks=[callback])
    return _files(directory), history.epoch, resumed.get_weights()


@pytest.mark.parametrize("save_freq", ["epoch", 4])
def test_offloaded_backups_resume_as_plain_keras(tmp_path, executor,
                                                  save_freq):
    plain = _interrupted_then_resumed(tmp_path / "plain", lambda cb: cb,
                                      save_freq)
    ours = _interrupted_then_resumed(
        tmp_path / "ours", lambda cb: AsyncCallback(cb, executor=executor),
        save_freq)
    (plain_files, plain_epochs, plain_weights) = plain
    (our_files, our_epochs, our_weights) = ours
    assert sorted(our_files) == sorted(plain_files)
    assert "latest.weights.h5.bkp" in our_files  # double_checkpoint
    for name in ("training_metadata.json", "training_metadata.json.bkp"):
        assert json.loads(our_files[name]) == json.loads(plain_files[name])
    assert_same_checkpoints(tmp_path / "plain", tmp_path / "ours")
    # Resumed where the last backup was: epoch 2, or 1 (its last batch).
    assert our_epochs == plain_epochs == (
        [2, 3] if save_freq == "epoch" else [1, 2, 3])
    for got, want in zip(our_weights, plain_weights):
        assert got.tobytes() == want.tobytes()


class OpenAtEnd(keras.callbacks.Callback):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def on_train_end(self, logs=None):
        self.gate.set()


def test_the_backup_is_removed_after_the_last_one_is_written(
        tmp_path, signals):
    """`on_train_end` removes the backup inline once the queued backups
    are written (they wait at a gate until that very hook): none lands
    after the removal to leave a backup behind."""
    gate = signals("gate")
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "b"),
                                              save_freq=1)
    wrapped = AsyncCallback(backup, executor="thread", max_pending=64,
                            max_snapshots=64)
    x, y = mnist_like(96)
    gated_model(gate.path).fit(x, y, epochs=1, batch_size=8, verbose=0,
                               callbacks=[OpenAtEnd(gate), wrapped])
    assert wrapped.stats().completed == 1 + 12  # set_model, the backups
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate.fifo"]


def test_a_list_offloads_backups_by_itself(tmp_path):
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "b"),
                                              delete_checkpoint=False)
    model = make_model()
    callbacks = AsyncCallbackList([backup], model=model, executor="thread",
                                  add_history=True)
    x, y = mnist_like(64)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=callbacks)
    stats = callbacks.stats().callbacks["BackupAndRestore"]
    assert stats.completed == 1 + 2  # set_model, and one backup per epoch.
    assert stats.save_paths == {
        "keras: first save of its layout (learning the file)": 1, "fast": 1}
    assert json.loads((tmp_path / "b" / "training_metadata.json")
                      .read_text()) == {"epoch": 2, "batch": 0}


class SeesWeightsAtBegin(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.seen = self.model.get_weights()[0].copy()


def test_callbacks_after_the_restore_see_the_restored_weights(tmp_path):
    """An offloaded callback listed after BackupAndRestore sees, at
    `on_train_begin`, the weights it restored, as in plain Keras, even if
    one listed before it took a snapshot of the weights before it."""
    x, y = mnist_like(96)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "b"),
                                              delete_checkpoint=False)
    with pytest.raises(RuntimeError, match="Interrupting"):
        make_model().fit(x, y, epochs=4, batch_size=16, verbose=0,
                         callbacks=[backup, InterruptAt(2)])
    shutil.copytree(tmp_path / "b", tmp_path / "plain")
    before, after = SeesWeightsAtBegin(), SeesWeightsAtBegin()
    model = make_model(seed=7)
    callbacks = AsyncCallbackList(
        [AsyncCallback(before, executor="thread", state="weights"), backup,
         AsyncCallback(after, executor="thread", state="weights")],
        model=model, add_history=True)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=callbacks)
    plain_before, plain_after = SeesWeightsAtBegin(), SeesWeightsAtBegin()
    plain_backup = keras.callbacks.BackupAndRestore(str(tmp_path / "plain"))
    make_model(seed=7).fit(x, y, epochs=3, batch_size=16, verbose=0,
                           callbacks=[plain_before, plain_backup,
                                      plain_after])
    assert before.seen.tobytes() == plain_before.seen.tobytes()
    assert after.seen.tobytes() == plain_after.seen.tobytes()
    assert after.seen.tobytes() != before.seen.tobytes()


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_run_killed_mid_backup_resumes_from_the_last_complete_one(
        tmp_path, executor):
    """SIGKILL while the second backup is half written: the first one is
    there, whole, and the next run resumes from it."""
    started = Signal(tmp_path / "started.fifo")
    gate = Signal(tmp_path / "gate.fifo")
    backup = tmp_path / "backup"
    child = subprocess.Popen(
        [sys.executable, str(TESTS / "backup_child.py"), str(backup),
         executor, started.path, gate.path, str(tmp_path)],
        stderr=subprocess.PIPE, text=True)
    try:
        assert started.wait(120) is not None, "the second backup never began"
        helpers = [pid for pid, _ in children_of(child.pid)]
        child.kill()
        assert child.wait(JOIN_TIMEOUT_S) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()
    for pid in helpers:  # The worker exits with its training process.
        assert wait_for_exit(pid, JOIN_TIMEOUT_S)
    # The first backup (end of epoch 1), complete. A worker process
    # removes its temporary file as it exits; a thread dies with the
    # process it writes in, which leaves its (hidden, named) one.
    names = sorted(os.listdir(backup))
    if executor == "thread":
        assert names[0].startswith(f".latest.asynccb-tmp-{child.pid}-")
        names = names[1:]
    assert names == ["latest.weights.h5", "training_metadata.json"]
    assert json.loads((backup / "training_metadata.json").read_text()) == {
        "epoch": 1, "batch": 0}
    epoch_1 = np.load(tmp_path / "weights-1.npz")
    # The next run restores it and resumes at epoch 1.
    model = gated_model(None)
    model(np.zeros((1, 784), np.float32))
    restored = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not restored:
                restored.append((epoch, [w.copy() for w in
                                         self.model.get_weights()]))

    x, y = mnist_like(64)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False,
              callbacks=[AsyncCallback(keras.callbacks.BackupAndRestore(
                  str(backup)), executor=executor), Record()])
    epoch, weights = restored[0]
    assert epoch == 1
    for index, got in enumerate(weights):
        assert got.tobytes() == epoch_1[f"w{index}"].tobytes()
