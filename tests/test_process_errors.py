"""Contract 8 across the process boundary: whatever fails in a worker
process (an exception that does not travel back, a class the worker cannot
load, a shared buffer it cannot map) reaches the training thread as an
`AsyncCallbackError` that keeps the original's type, message and the
worker's traceback, never as a pickle error or a dead worker."""

from __future__ import annotations

import os
import resource
import sys
import threading
import textwrap

import keras
import pytest

import asynccb
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like, worker_processes

from asynccb import AsyncCallback, AsyncCallbackError, WorkerDiedError
from asynccb._errors import RemoteError, RemoteTraceback


class NeedsTwoArguments(Exception):
    """Pickles (as its one `args` item) but cannot be unpickled: its
    `__init__` wants two arguments."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


class HoldsALock(Exception):
    """Cannot be pickled at all."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class Raises(keras.callbacks.Callback):
    def __init__(self, make_exception):
        super().__init__()
        self.make_exception = make_exception

    def on_epoch_end(self, epoch, logs=None):
        raise self.make_exception(epoch)


def _fit(callbacks, model=None, epochs=2):
    x, y = mnist_like(64)
    model = model or make_model()
    return model.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
                     callbacks=callbacks)


@pytest.mark.parametrize("make_exception, expected, reason", [
    (lambda epoch: NeedsTwoArguments("no luck", f"epoch {epoch}"),
     "NeedsTwoArguments: no luck at epoch 0",
     "it could not be rebuilt in the training process: TypeError"),
    (lambda epoch: HoldsALock(f"locked at epoch {epoch}"),
     "HoldsALock: locked at epoch 0",
     "it could not be pickled in the worker"),
], ids=["does-not-unpickle", "does-not-pickle"])
def test_exception_that_cannot_travel_back(make_exception, expected, reason):
    callback = AsyncCallback(Raises(make_exception), executor="process",
                             state="none")
    with pytest.raises(AsyncCallbackError) as caught:
        _fit([callback])
    text = str(caught.value)
    assert "Raises.on_epoch_end(epoch=0) failed in its process worker" in text
    assert expected in text
    assert reason in text
    # The worker's traceback, as text, down to the raise.
    assert "Traceback in the worker:" in text
    assert f'File "{__file__}"' in text
    assert "raise self.make_exception(epoch)" in text
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.type_name == f"{__name__}.{expected.split(':')[0]}"
    assert not isinstance(caught.value, WorkerDiedError)


def test_blueprint_class_the_worker_cannot_import(tmp_path, monkeypatch):
    """A custom layer from a module that imports in the training process
    only (it needs something only there): the worker reports the
    ImportError, with its traceback, instead of dying."""
    module = "asynccb_trainer_only_layers"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f'''
        import os
        import keras

        if os.getpid() != {os.getpid()}:
            raise ImportError("{module} imports in the training process only")

        class TrainerOnly(keras.layers.Layer):
            def call(self, inputs):
                return inputs
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    layers = __import__(module)
    model = keras.Sequential([keras.Input((784,)), layers.TrainerOnly(),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(True))
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    with pytest.raises(AsyncCallbackError) as caught:
        _fit([AsyncCallback(checkpoint, executor="process")], model=model)
    sys.modules.pop(module, None)
    text = str(caught.value)
    assert "failed in its process worker: ImportError" in text
    assert f"{module} imports in the training process only" in text
    cause = caught.value.__cause__
    assert isinstance(cause, ImportError)
    remote = cause.__cause__
    assert isinstance(remote, RemoteTraceback)
    assert f"{module}.py" in remote.text
    assert not isinstance(caught.value, WorkerDiedError)
    assert not (tmp_path / "m.keras").exists()


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(len(used) + 1) if fd not in used)


def test_shared_buffer_the_worker_cannot_map(signals):
    """The worker runs out of file descriptors just before it maps its
    first snapshot: the OSError comes back with the worker's traceback,
    and the worker, alive, is stopped as usual."""
    started, gate = signals("started"), signals("gate")

    class ReadsWeights(keras.callbacks.Callback):
        def __init__(self, started, gate):
            super().__init__()
            self.started, self.gate = started, gate

        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 0:  # Its pipes are open before the limit is set.
                self.gate.open()
                self.started.set()
                assert self.gate.wait(JOIN_TIMEOUT_S), "gate never opened"

        def on_epoch_end(self, epoch, logs=None):
            self.model.get_weights()

    class LimitsTheWorker(keras.callbacks.Callback):
        """Inline, after the snapshot of `on_epoch_end(0)` was taken."""

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                assert started.wait(JOIN_TIMEOUT_S), "worker never started"
                [(pid, _)] = worker_processes()
                free = _lowest_free_fd(pid)
                resource.prlimit(pid, resource.RLIMIT_NOFILE, (free, free))
                gate.set()

    offloaded = AsyncCallback(
        ReadsWeights(started, gate), executor="process",
        state={"on_epoch_begin": "none", "on_epoch_end": "weights"})
    try:
        with pytest.raises(AsyncCallbackError) as caught:
            _fit([offloaded, LimitsTheWorker()], epochs=3)
    finally:
        asynccb.shutdown()  # The warm worker keeps its limit: retire it.
    text = str(caught.value)
    assert "ReadsWeights.on_epoch_end(epoch=0) failed in its process" in text
    assert "Too many open files" in text
    cause = caught.value.__cause__
    assert isinstance(cause, OSError)
    assert "shared_memory" in cause.__cause__.text
    assert not isinstance(caught.value, WorkerDiedError)
