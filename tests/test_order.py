"""Contract 3: one offloaded callback's hooks run in the order Keras calls
them, one at a time; different callbacks run concurrently."""

from __future__ import annotations

import os

import keras
import pytest
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like
from recording import Gated, OnTrainEnd, Recorder

from asynccb import AsyncCallback, AsyncCallbackList


def _run_all(model, callbacks_for):
    """fit (with validation), evaluate and predict, each with fresh
    callbacks from `callbacks_for(recorder)`."""
    x, y = mnist_like(128)
    recorder = Recorder()
    model.fit(x, y, epochs=2, batch_size=32, validation_split=0.25,
              verbose=0, callbacks=callbacks_for(recorder, model))
    model.evaluate(x, y, batch_size=64, verbose=0,
                   callbacks=callbacks_for(recorder, model))
    model.predict(x, batch_size=64, verbose=0,
                  callbacks=callbacks_for(recorder, model))
    return recorder


@pytest.mark.parametrize("form", ["AsyncCallback", "AsyncCallbackList"])
def test_hook_order_matches_keras(executor, form):
    plain = _run_all(make_model(), lambda rec, model: [rec])
    if form == "AsyncCallback":
        def wrap(rec, model):
            return [AsyncCallback(rec, executor=executor, state="none")]
    else:
        def wrap(rec, model):
            # Keras' list is built with the model and params; ours too.
            return AsyncCallbackList(
                [AsyncCallback(rec, executor=executor, state="none")],
                add_history=True, model=model, verbose=0, epochs=2,
            )
    ours = _run_all(make_model(), wrap)
    expected = plain.calls
    if form == "AsyncCallbackList":
        # Keras gives its own list the fit's params; a list passed to fit
        # keeps the params it was built with.
        expected = [c for c in expected if c[0] != "set_params"]
        ours_calls = [c for c in ours.calls if c[0] != "set_params"]
    else:
        ours_calls = ours.calls
    assert ours_calls == expected
    assert (os.getpid(), "MainThread") not in ours.threads


class Fast(keras.callbacks.Callback):
    def __init__(self, reached_end):
        super().__init__()
        self.reached_end = reached_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 2:
            self.reached_end.set()


def test_slow_callback_does_not_delay_another(executor, signals):
    gate = signals("gate")
    fast_reached_end = signals("fast")
    slow = Gated(gate)

    def check_then_release():
        # Training is over; the fast callback caught up while the slow one
        # is still stuck on its first epoch.
        assert fast_reached_end.wait(JOIN_TIMEOUT_S)
        assert slow.done == []
        gate.set()

    x, y = mnist_like(128)
    make_model().fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[
        OnTrainEnd(check_then_release),  # First: runs before any drain.
        AsyncCallback(slow, executor=executor, state="none"),
        AsyncCallback(Fast(fast_reached_end), executor=executor,
                      state="none"),
    ])
    assert slow.done == [0, 1, 2]
