"""The process executor: custom classes, crashes, orphans, shared memory,
and callbacks that cannot travel."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import keras
import numpy as np
import pytest
from artifacts import assert_same_checkpoints
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like, shared_segments
from crossproc import children_of, wait_for_exit
from gated import GatedSave
from recording import LiveWeights

from asynccb import AsyncCallback, AsyncCallbackError, WorkerDiedError
from asynccb._executors import EXECUTORS

TESTS = Path(__file__).resolve().parent


class Doubler(keras.layers.Layer):
    """Not registered with Keras: the worker gets it from this module."""

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],),
                                    initializer="ones")

    def call(self, inputs):
        return inputs * self.gain * 2.0


def _model(layer):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((784,)), layer,
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    return model


def _load(path, **custom):
    return keras.models.load_model(path, custom_objects=custom)


def test_custom_layer_of_this_module_checkpointed_by_a_worker(tmp_path):
    x, y = mnist_like(128)
    for name, wrap in (("plain", lambda cb: cb),
                       ("ours", lambda cb: AsyncCallback(cb,
                                                         executor="process"))):
        (tmp_path / name).mkdir()
        checkpoint = keras.callbacks.ModelCheckpoint(
            str(tmp_path / name / "{epoch}.keras"))
        _model(Doubler()).fit(x, y, epochs=2, batch_size=32, verbose=0,
                              shuffle=False, callbacks=[wrap(checkpoint)])
    assert len(assert_same_checkpoints(tmp_path / "plain",
                                       tmp_path / "ours")) == 2
    # The file loads in a fresh interpreter.
    loader = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(TESTS)!r})
        import keras
        from test_process import Doubler
        model = keras.models.load_model({str(tmp_path / 'ours' / '2.keras')!r},
                                        custom_objects={{"Doubler": Doubler}})
        print(type(model.layers[0]).__name__, model.count_params())
    """)
    loaded = subprocess.run([sys.executable, "-c", loader], text=True,
                            capture_output=True, timeout=120)
    assert loaded.stdout.split() == ["Doubler", str(784 + 784 * 10 + 10)], (
        loaded.stderr[-2000:])


def test_worker_killed_mid_save(tmp_path, signals):
    started, gate = signals("started"), signals("gate")
    model = _model(GatedSave(gate.path, started=started.path, free=1))
    live = LiveWeights()
    begun = []

    class KillsTheSavingWorker(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
            if epoch == 2:  # The save of epoch 1 is under way.
                pid = int(started.wait(JOIN_TIMEOUT_S))
                os.kill(pid, signal.SIGKILL)
                assert wait_for_exit(pid, JOIN_TIMEOUT_S)

    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "model.keras"))
    x, y = mnist_like(128)
    with pytest.raises(WorkerDiedError) as caught:
        model.fit(x, y, epochs=10, batch_size=32, verbose=0, shuffle=False,
                  callbacks=[live, KillsTheSavingWorker(),
                             AsyncCallback(checkpoint, executor="process")])
    error = caught.value
    assert isinstance(error, AsyncCallbackError)
    assert error.exitcode == -signal.SIGKILL and error.signal == "SIGKILL"
    assert "killed by SIGKILL" in str(error)
    assert "model.save(" in str(error)
    assert begun[-1] == 2  # Raised at the next hook, not at the end.
    # The previous checkpoint is intact: epoch 0's, complete, loadable.
    restored = _load(tmp_path / "model.keras", GatedSave=GatedSave)
    for got, want in zip(restored.get_weights(), live.weights[0]):
        np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in tmp_path.iterdir()
                  if not p.name.endswith(".fifo")) == ["model.keras"]


TRAINER = """
import sys
sys.path.insert(0, {tests!r})
import keras
from asynccb import AsyncCallback
from conftest import mnist_like
from gated import GatedSave
from test_process import _model

model = _model(GatedSave({gate!r}, started={started!r}, free=1))
x, y = mnist_like(128)
checkpoint = keras.callbacks.ModelCheckpoint({path!r})
model.fit(x, y, epochs=10, batch_size=32, verbose=0,
          callbacks=[AsyncCallback(checkpoint, executor="process")])
"""


def test_trainer_killed_mid_save_leaves_nothing_behind(tmp_path, signals):
    started, gate = signals("started"), signals("gate")
    path = tmp_path / "model.keras"
    script = tmp_path / "train.py"
    script.write_text(TRAINER.format(tests=str(TESTS), started=started.path,
                                     gate=gate.path, path=str(path)))
    trainer = subprocess.Popen([sys.executable, str(script)])
    try:
        worker = int(started.wait(120))  # The second save is under way.
        children = [pid for pid, _ in children_of(trainer.pid)]
        assert worker in children
        trainer.kill()
    finally:
        trainer.kill()
        trainer.wait()
    # Its worker (lifeline) and resource tracker (unlinks the shared
    # memory) notice, and exit by themselves.
    for pid in children:
        assert wait_for_exit(pid, JOIN_TIMEOUT_S), f"{pid} outlived it"
    assert shared_segments(trainer.pid) == []
    assert isinstance(_load(path, GatedSave=GatedSave), keras.Model)
    assert sorted(p.name for p in tmp_path.iterdir()
                  if not p.name.endswith(".fifo")) == ["model.keras",
                                                       "train.py"]


class HoldsALock(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def on_epoch_end(self, epoch, logs=None):
        with self.lock:
            pass


def test_unpicklable_callback_fails_before_training():
    with pytest.raises(TypeError) as caught:
        AsyncCallback(HoldsALock(), executor="process")
    message = str(caught.value)
    assert "HoldsALock cannot be sent to a worker process: attribute " \
           "'lock' (lock: " in message
    assert "executor='thread'" in message


def test_attribute_gone_unpicklable_before_fit_fails_before_training():
    class Uploads(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            pass

    callback = Uploads()
    wrapper = AsyncCallback(callback, executor="process", state="none")
    callback.connection = socket.socket()  # Set after wrapping.
    steps = []

    class Counts(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            steps.append(batch)

    x, y = mnist_like(64)
    try:
        with pytest.raises(TypeError, match="attribute 'connection' "
                                            r"\(socket: "):
            _model(Doubler()).fit(x, y, epochs=1, verbose=0,
                                  callbacks=[Counts(), wrapper])
    finally:
        callback.connection.close()
    assert steps == []


class ExitsAt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            os._exit(3)


def test_worker_exiting_on_its_own():
    x, y = mnist_like(64)
    with pytest.raises(WorkerDiedError) as caught:
        _model(Doubler()).fit(x, y, epochs=4, batch_size=32, verbose=0,
                              callbacks=[AsyncCallback(
                                  ExitsAt(), executor="process",
                                  state="none")])
    assert caught.value.exitcode == 3 and caught.value.signal is None
    assert "exit code 3" in str(caught.value)
    assert "on_epoch_end(epoch=1)" in str(caught.value)


class ReportsPid(keras.callbacks.Callback):
    def __init__(self, pid_signal):
        super().__init__()
        self.pid_signal = pid_signal

    def on_train_begin(self, logs=None):
        self.pid_signal.set(str(os.getpid()).encode())


def test_idle_worker_death_is_noticed(signals):
    pid_signal = signals("pid")
    begun = []
    wrapper = AsyncCallback(ReportsPid(pid_signal), executor="process",
                            state="none")

    class KillsIdleWorker(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
            if epoch == 1:
                pid = int(pid_signal.wait(JOIN_TIMEOUT_S))
                wrapper._lane.channel.join()  # It has nothing left to do.
                os.kill(pid, signal.SIGKILL)
                assert wait_for_exit(pid, JOIN_TIMEOUT_S)

    x, y = mnist_like(64)
    with pytest.raises(WorkerDiedError, match="died while idle"):
        _model(Doubler()).fit(x, y, epochs=50, batch_size=32, verbose=0,
                              callbacks=[KillsIdleWorker(), wrapper])
    assert begun[-1] < 10  # Noticed while training went on, not at the end.


class RecordsItsWorker(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        import tensorflow as tf

        self.pid = os.getpid()
        self.cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.gpus = len(tf.config.get_visible_devices("GPU"))
        self.threads = tf.config.threading.get_intra_op_parallelism_threads()
        self.niceness = os.nice(0)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs = getattr(self, "epochs", 0) + 1
        self.last_epoch = lambda: epoch  # Plain pickle cannot send it.


def test_worker_is_set_apart_and_state_comes_back(caplog):
    callback = RecordsItsWorker()
    x, y = mnist_like(64)
    _model(Doubler()).fit(x, y, epochs=3, batch_size=32, verbose=0,
                          callbacks=[AsyncCallback(callback,
                                                   executor="process",
                                                   state="none")])
    assert callback.pid != os.getpid()
    assert callback.cuda == "-1" and callback.gpus == 0
    assert callback.threads == 1
    assert callback.niceness > os.nice(0)
    assert callback.epochs == 3  # The worker's state, copied back.
    assert callback.last_epoch() == 2
    assert not any("stays as it was" in message
                   for message in caplog.messages), caplog.messages


class KernelAtEpochEnd(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.kernels = {}

    def on_epoch_end(self, epoch, logs=None):
        self.kernels[epoch] = self.model.get_weights()[0]


def test_process_lane_appended_to_a_list_at_work():
    """Snapshot buffers so far were private (thread lanes only): a worker
    process joining the run must get its snapshots in shared memory."""
    from asynccb import AsyncCallbackList

    model = _model(Doubler())
    in_thread, in_process = KernelAtEpochEnd(), KernelAtEpochEnd()
    callbacks = AsyncCallbackList(
        [AsyncCallback(in_thread, executor="thread", state="weights")],
        model=model)
    x, y = mnist_like(64)
    callbacks.on_train_begin()
    for epoch in range(3):
        if epoch == 1:
            callbacks.append(AsyncCallback(in_process, executor="process",
                                           state="weights"))
        callbacks.on_epoch_begin(epoch)
        logs = model.train_on_batch(x, y, return_dict=True)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end()
    assert sorted(in_process.kernels) == [1, 2]
    for epoch in (1, 2):
        np.testing.assert_array_equal(in_process.kernels[epoch],
                                      in_thread.kernels[epoch])


class RecordsItsShadow(keras.callbacks.Callback):
    """In the worker: which process and which shadow each run ended with
    (the first run's shadow is rebuilt once, when the optimizer is built
    in its first step)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_end(self, logs=None):
        self.seen.append((os.getpid(), id(self.model)))


def test_a_later_fit_reuses_the_warm_worker_and_its_shadow():
    """Guarantee 14: the second `fit` pays no TensorFlow import and no
    rebuild of its unchanged model's shadow; two callbacks share the one
    worker, each on its own thread there."""
    from conftest import worker_processes

    first, second = RecordsItsShadow(), RecordsItsShadow()
    callbacks = [AsyncCallback(first, executor="process", state="weights"),
                 AsyncCallback(second, executor="process", state="weights")]
    model = _model(Doubler())
    x, y = mnist_like(64)
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0,
                  callbacks=callbacks)
        assert len(worker_processes()) == 1  # Still there, between fits.
    (pid, shadow), (pid_again, shadow_again) = first.seen
    assert pid_again == pid != os.getpid()
    assert shadow_again == shadow  # Not rebuilt.
    assert second.seen[0][0] == pid  # The same worker serves both.


def _segments_mapped(pid: int) -> tuple[set[str], set[str]]:
    """The asynccb segments process `pid` maps: all, and those removed."""
    with open(f"/proc/{pid}/maps") as maps:
        lines = [line for line in maps if "/asynccb-" in line]
    return ({line.split()[5] for line in lines},
            {line.split()[5] for line in lines
             if line.endswith("(deleted)\n")})


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux only")
def test_the_next_run_reuses_the_snapshot_segments_the_worker_maps():
    """A run's snapshot buffers outlive it, kept for the next run: fits
    with new callbacks reuse the same segments, which the warm worker
    still maps (neither side pages in a new one), and the worker maps no
    segment the training process removed."""
    from asynccb._executors.process.shared_memory import (
        free_kept,
        kept_segments,
    )

    free_kept()  # Those of earlier tests' models.
    model = make_model()
    x, y = mnist_like(64)
    runs = []
    for _ in range(3):
        callback = RecordsItsWorker()
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[
            AsyncCallback(callback, executor="process", state="weights")])
        mapped, removed = _segments_mapped(callback.pid)
        runs.append((sorted(kept_segments()), mapped, removed))
    kept = runs[0][0]
    assert 1 <= len(kept) <= 2  # This run's buffers: `max_snapshots`.
    assert sorted(shared_segments()) == kept
    for kept_again, mapped, removed in runs:
        assert kept_again == kept
        assert mapped and {n.rsplit("/", 1)[1] for n in mapped} <= set(kept)
        assert not removed


def test_idle_worker_stops_after_the_timeout():
    from conftest import worker_processes

    import asynccb

    asynccb.shutdown()
    try:
        x, y = mnist_like(64)
        callback = RecordsItsShadow()
        _model(Doubler()).fit(x, y, epochs=1, batch_size=32, verbose=0,
                              callbacks=[AsyncCallback(callback,
                                                       executor="process",
                                                       state="weights")])
        [(pid, _)] = worker_processes()
        assert callback.seen[0][0] == pid
        # Idle now, counting down the default 10 minutes: a new timeout
        # restarts the countdown.
        assert shared_segments()  # Its snapshot buffers, kept for it.
        asynccb.configure_workers(idle_timeout=0.2)
        assert wait_for_exit(pid, JOIN_TIMEOUT_S), "the idle worker stayed"
        assert worker_processes() == []
        assert shared_segments() == []  # Freed with it.
    finally:
        asynccb.configure_workers()


def test_processes_spread_callbacks_over_workers():
    """`configure_workers(processes=2)` after a `fit` on one worker: the
    next `fit` spreads the two callbacks over two workers, and each goes
    back to its own at the one after (its shadow is there); lowering the
    count stops the idle surplus at once."""
    from conftest import worker_processes

    import asynccb

    asynccb.shutdown()
    try:
        first, second = RecordsItsShadow(), RecordsItsShadow()
        callbacks = [
            AsyncCallback(first, executor="process", state="weights"),
            AsyncCallback(second, executor="process", state="weights")]
        model = _model(Doubler())
        x, y = mnist_like(64)
        model.fit(x, y, epochs=1, batch_size=32, verbose=0,
                  callbacks=callbacks)
        assert first.seen[0][0] == second.seen[0][0]  # One worker.
        asynccb.configure_workers(processes=2)
        for _ in range(2):
            model.fit(x, y, epochs=1, batch_size=32, verbose=0,
                      callbacks=callbacks)
        assert first.seen[1] == first.seen[2]  # Same worker, same shadow.
        assert second.seen[1] == second.seen[2]
        pids = {first.seen[1][0], second.seen[1][0]}
        assert len(pids) == 2 and os.getpid() not in pids
        assert {pid for pid, _ in worker_processes()} == pids
        asynccb.configure_workers(processes=1)
        [(kept, _)] = worker_processes()
        [stopped] = pids - {kept}
        assert wait_for_exit(stopped, JOIN_TIMEOUT_S)
    finally:
        asynccb.configure_workers()


def test_shutdown_during_a_run_is_an_error():
    import asynccb

    attempts = []

    class ShutsDown(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            try:
                asynccb.shutdown()
            except RuntimeError as exc:
                attempts.append(str(exc))

    x, y = mnist_like(64)
    callback = RecordsItsShadow()
    _model(Doubler()).fit(x, y, epochs=2, batch_size=32, verbose=0,
                          callbacks=[AsyncCallback(callback,
                                                   executor="process",
                                                   state="none"),
                                     ShutsDown()])
    assert len(attempts) == 2
    assert "call it after `fit` returns" in attempts[0]
    assert len(callback.seen) == 1  # The run went on, in its worker.


class RecordsItsCpus(keras.callbacks.Callback):
    """Where its hooks ran: the process and the CPUs it may use."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append((os.getpid(), sorted(os.sched_getaffinity(0))))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to tell pinned from not")
def test_workers_run_on_the_cpus_given():
    """`configure_workers(cpus=...)`: the worker process and the threads
    of every executor run there; the training thread stays where it was."""
    import asynccb

    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[-1]
    asynccb.shutdown()
    asynccb.configure_workers(cpus={chosen})
    try:
        recorders = {name: RecordsItsCpus() for name in EXECUTORS}
        x, y = mnist_like(64)
        _model(Doubler()).fit(x, y, epochs=1, batch_size=32, verbose=0,
                              callbacks=[
                                  AsyncCallback(recorder, executor=name,
                                                state="none")
                                  for name, recorder in recorders.items()])
        for name, recorder in recorders.items():
            [(pid, cpus)] = recorder.seen
            assert cpus == [chosen], name
            assert (pid != os.getpid()) == (name == "process"), name
        assert sorted(os.sched_getaffinity(0)) == allowed
    finally:
        asynccb.configure_workers()
        asynccb.shutdown()  # Its next worker goes anywhere again.
