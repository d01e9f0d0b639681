"""Contract 8 and 10: offloaded failures surface on the training thread with
the original exception; no thread is left, however a run ends."""

from __future__ import annotations

import threading
import traceback

import keras
import pytest
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like

from asynccb._errors import RemoteTraceback
from asynccb import (
    AsyncCallback,
    AsyncCallbackError,
    AsyncCallbackList,
    ControlFromWorkerError,
)


class Boom(keras.callbacks.Callback):
    """Raises in `on_epoch_end` of epoch `at`, after waiting on `gate`."""

    def __init__(self, at=0, gate=None, raised=None):
        super().__init__()
        self.at = at
        self.gate = gate
        self.raised = raised

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            if self.gate is not None:
                assert self.gate.wait(JOIN_TIMEOUT_S)
            if self.raised is not None:
                self.raised.set()
            raise ValueError(f"boom at epoch {epoch}")


def _fit(callbacks, epochs=3, **kwargs):
    x, y = mnist_like(128)
    model = kwargs.pop("model", None) or make_model()
    return model.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
                     shuffle=False, callbacks=callbacks, **kwargs)


@pytest.mark.parametrize("form", ["AsyncCallback", "AsyncCallbackList"])
def test_hook_exception_surfaces_with_worker_traceback(executor, form):
    callbacks = [AsyncCallback(Boom(at=1), executor=executor, state="none")]
    model = make_model()
    if form == "AsyncCallbackList":
        callbacks = AsyncCallbackList(callbacks, model=model, add_history=True)
    with pytest.raises(AsyncCallbackError) as caught:
        _fit(callbacks, model=model)
    error = caught.value
    assert isinstance(error.__cause__, ValueError)
    assert str(error.__cause__) == "boom at epoch 1"
    assert "Boom.on_epoch_end(epoch=1)" in str(error)
    assert "ValueError: boom at epoch 1" in str(error)
    if executor == "process":
        # Tracebacks do not cross processes: the worker's comes as text.
        remote = error.__cause__.__cause__
        assert isinstance(remote, RemoteTraceback)
        assert f'File "{__file__}"' in remote.text
        assert remote.text.rstrip().endswith("ValueError: boom at epoch 1")
    else:
        frames = traceback.extract_tb(error.__cause__.__traceback__)
        assert frames[-1].name == "on_epoch_end"
        assert frames[-1].filename == __file__
    printed = "".join(traceback.format_exception(error))
    assert "The above exception was the direct cause" in printed
    assert 'raise ValueError(f"boom at epoch {epoch}")' in printed


def test_failure_raises_at_next_hook_not_only_at_the_end(executor, signals):
    boom = Boom(at=0, raised=signals("raised"))
    begun = []

    class Waits(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            begun.append(epoch)
            if epoch == 1:
                # The worker has raised; the failure is recorded right after.
                assert boom.raised.wait(JOIN_TIMEOUT_S)

    with pytest.raises(AsyncCallbackError):
        _fit([Waits(), AsyncCallback(boom, executor=executor, state="none")],
             epochs=20)
    assert begun[-1] < 19, "the failure waited for the end of training"


def test_error_lists_the_hooks_still_queued(executor, signals):
    gate = signals("gate")

    class OpenAtEpoch2(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                gate.set()

    with pytest.raises(AsyncCallbackError) as caught:
        _fit([AsyncCallback(Boom(at=0, gate=gate), executor=executor,
                            state="none"), OpenAtEpoch2()], epochs=4)
    pending = caught.value.pending
    assert "on_epoch_end(epoch=1)" in pending
    assert "on_epoch_end(epoch=2)" in pending
    assert "still queued: on_epoch_end(epoch=1)" in str(caught.value)


def test_save_error_keeps_its_type(tmp_path, executor):
    target = tmp_path / "taken.keras"
    target.mkdir()  # A directory where the checkpoint file should go.
    checkpoint = keras.callbacks.ModelCheckpoint(str(target))
    with pytest.raises(AsyncCallbackError) as caught:
        _fit([AsyncCallback(checkpoint, executor=executor)], epochs=1)
    assert isinstance(caught.value.__cause__, OSError)
    assert target.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["taken.keras"]


@pytest.mark.parametrize("exception", [RuntimeError, KeyboardInterrupt])
def test_fit_raising_elsewhere_leaves_no_thread_and_loses_nothing(
    tmp_path, executor, exception
):
    """A synchronous callback raises: Keras calls no `on_train_end`, yet the
    workers finish what was queued and stop (the autouse fixture checks)."""

    class Fails(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise exception("user error")

    csv = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    with pytest.raises(exception):
        _fit([AsyncCallback(csv, executor=executor), Fails()], epochs=3)
    workers = [t for t in threading.enumerate()  # The warm pool stays.
               if t.name.startswith("asynccb")
               and not t.name.startswith("asynccb-pool")]
    for thread in workers:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(t.is_alive() for t in workers)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]


def test_control_from_worker_is_an_error(executor):
    class Stops(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    with pytest.raises(AsyncCallbackError) as caught:
        _fit([AsyncCallback(Stops(), executor=executor, state="none")])
    assert isinstance(caught.value.__cause__, ControlFromWorkerError)
    assert "deferred_control=True" in str(caught.value.__cause__)
