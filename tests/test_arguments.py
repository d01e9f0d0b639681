"""Contract 2 and 11: bad input gets a clear error before training starts."""

from __future__ import annotations

import inspect

import keras
import numpy as np
import pytest

from asynccb import AsyncCallback, AsyncCallbackList
from asynccb._options import Options


def _csv(tmp_path):
    return keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))


# Every bad value of the offloading options (executor, max_pending, on_full,
# max_snapshots) is checked once, on `Options`, in unit/test_options.py;
# here one shows that AsyncCallback reports them, beside its own arguments.
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"executor": "gpu"}, "`executor` must be one of 'thread', 'process', 'async'. "
                              "Received: executor='gpu'"),
        ({"state": "everything"}, "`state` must be one of 'none', "
                                  "'scalars', 'weights', 'full'. "
                                  "Received: state='everything'"),
        ({"state": {"on_epoch_finish": "full"}},
         "`state` maps unknown hook names ['on_epoch_finish']"),
        ({"state": {"on_epoch_end": "most"}},
         "Received: state['on_epoch_end']='most'"),
    ],
)
def test_async_callback_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as caught:
        AsyncCallback(_csv(tmp_path), **kwargs)
    assert message in str(caught.value)


@pytest.mark.parametrize("value", ["callback", None, 42,
                                   keras.layers.Dense(1)])
def test_not_a_callback(value):
    with pytest.raises(TypeError, match="must be a `keras.callbacks.Callback` "
                                        "instance. Received: callback="):
        AsyncCallback(value)
    with pytest.raises(TypeError, match="Received: callbacks="):
        AsyncCallbackList([value])


def test_wrapping_twice(tmp_path):
    with pytest.raises(ValueError, match="already an AsyncCallback"):
        AsyncCallback(AsyncCallback(_csv(tmp_path)))


@pytest.mark.parametrize("control", [
    keras.callbacks.EarlyStopping(),
    keras.callbacks.ReduceLROnPlateau(),
    keras.callbacks.LearningRateScheduler(lambda epoch, lr: lr),
    keras.callbacks.TerminateOnNaN(),
    keras.callbacks.History(),
    keras.callbacks.ProgbarLogger(),
    keras.callbacks.SwapEMAWeights(),
])
def test_control_callbacks_stay_synchronous(control):
    name = type(control).__name__
    with pytest.raises(ValueError) as caught:
        AsyncCallback(control)
    message = str(caught.value)
    assert f"{name} controls training" in message
    assert "deferred_control=True" in message
    assert message.endswith(f"Received: callback={name}")


def test_declared_control_callback():
    class Steers(keras.callbacks.Callback):
        asynccb_control = True

    with pytest.raises(ValueError, match="Steers controls training"):
        AsyncCallback(Steers())
    # In a list it simply stays inline.
    assert AsyncCallbackList([Steers()]).callbacks[0].__class__ is Steers
    assert AsyncCallback(Steers(), deferred_control=True).executor == "thread"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"offload": "everything"}, "`offload` must be one of 'auto', "
                                    "'explicit'. Received: offload="),
        ({"executor": "fiber"}, "Received: executor='fiber'"),
        ({"max_pending": 0}, "Received: max_pending=0"),
        ({"on_full": "skip"}, "Received: on_full='skip'"),
        ({"max_snapshots": -1}, "Received: max_snapshots=-1"),
    ],
)
def test_callback_list_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as caught:
        AsyncCallbackList([_csv(tmp_path)], **kwargs)
    assert message in str(caught.value)


@pytest.mark.parametrize("cls", [AsyncCallback, AsyncCallbackList])
def test_option_defaults_are_those_of_options(cls):
    parameters = inspect.signature(cls).parameters
    for field in ("executor", "max_pending", "on_full", "max_snapshots"):
        assert parameters[field].default == getattr(Options(), field), field


def test_list_wraps_with_its_options(tmp_path):
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    callbacks = AsyncCallbackList(
        [_csv(tmp_path), checkpoint],
        executor="async", max_pending=3, on_full="latest")
    for wrapped in callbacks.callbacks:
        assert isinstance(wrapped, AsyncCallback)
        assert wrapped.executor == "async"
        assert wrapped._lane.channel.capacity == 3
        assert wrapped._lane.policy == "latest"

    # Without an executor, each gets its own default.
    csv, checkpoint = AsyncCallbackList(
        [_csv(tmp_path), keras.callbacks.ModelCheckpoint(
            str(tmp_path / "n.keras"))]).callbacks
    assert (csv.executor, checkpoint.executor) == ("thread", "process")
    assert csv._lane.channel.capacity == Options().max_pending
    assert checkpoint._lane.policy == Options().on_full


def test_options_are_checked_once(tmp_path, monkeypatch):
    checks = []
    post_init = Options.__post_init__

    def counting(self):
        checks.append(self)
        post_init(self)

    monkeypatch.setattr(Options, "__post_init__", counting)
    AsyncCallbackList(
        [_csv(tmp_path), keras.callbacks.ModelCheckpoint(
            str(tmp_path / "m.keras"))], max_pending=5)
    assert [options.max_pending for options in checks] == [5]
    checks.clear()
    AsyncCallback(_csv(tmp_path), max_pending=7)
    assert [options.max_pending for options in checks] == [7]


def test_unrebuildable_model_fails_before_training(tmp_path):
    class NoConfig(keras.layers.Layer):
        def __init__(self, inner):  # Not serializable: a layer argument.
            super().__init__()
            self.inner = inner

        def call(self, x):
            return self.inner(x)

    model = keras.Sequential([keras.Input((4,)), NoConfig(keras.layers.Dense(2))])
    model.compile(optimizer="sgd", loss="mse")

    class Reads(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.get_weights()

    x = np.zeros((8, 4), "float32")
    seen = []

    class Counts(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    with pytest.raises(ValueError) as caught:
        model.fit(x, x[:, :2], epochs=2, verbose=0,
                  callbacks=[Counts(), AsyncCallback(Reads(), state="weights")])
    assert seen == []  # Raised before the first step.
    message = str(caught.value)
    assert "layer 'no_config' (NoConfig)" in message
    assert "does not implement `get_config()`" in message


def test_callback_list_without_model_fails_before_training(tmp_path):
    """Keras does not give its model to a list it is passed: say so, and
    what to do, before the first step, instead of an AttributeError in a
    worker."""
    from conftest import worker_processes

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    x = np.zeros((8, 4), "float32")
    seen = []

    class Counts(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)

    workers = worker_processes()
    callbacks = AsyncCallbackList(
        [Counts(), keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras")),
         _csv(tmp_path)], add_history=True)
    with pytest.raises(ValueError) as caught:
        model.fit(x, x[:, :2], epochs=2, verbose=0, callbacks=callbacks)
    assert seen == []
    message = str(caught.value)
    assert "ModelCheckpoint need one" in message  # Not CSVLogger: it needs none.
    assert "AsyncCallbackList(callbacks, model=model, ...)" in message
    assert message.endswith("Received: model=None")
    assert worker_processes() == workers  # None started.
    assert not (tmp_path / "m.keras").exists()

    # A list whose offloaded callbacks need no model works without one (in
    # a hand-written loop: `fit` itself needs a History on the model).
    callbacks = AsyncCallbackList([_csv(tmp_path)])
    callbacks.on_train_begin()
    callbacks.on_epoch_end(0, {"loss": 0.5})
    callbacks.on_train_end()
    assert (tmp_path / "log.csv").read_text().splitlines() == [
        "epoch,loss,val_loss", "0,0.5,NA"]  # As Keras writes it.
