"""`AsyncCallbackList` as a drop-in for `keras.callbacks.CallbackList`: in
fit, in hand-written loops, with auto-offloading, stats and warnings."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from artifacts import assert_same_checkpoints
from conftest import make_model, mnist_like
from recording import Recorder

from asynccb import AsyncCallback, AsyncCallbackList

EPOCHS = 2


def _callbacklist_loop(list_class, tmp_path, name, executor="thread"):
    """The loop of the `keras.callbacks.Callback` docs, verbatim but for
    the data: `CallbackList`, `append`, `train_step` per batch."""
    out = tmp_path / name
    out.mkdir()
    model = make_model()
    x, y = mnist_like(128)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    recorder = Recorder()
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(out / "{epoch:02d}.weights.h5"), save_weights_only=True,
        monitor="loss")
    callbacks = [keras.callbacks.CSVLogger(str(out / "log.csv")), recorder]
    params = dict(add_history=True, model=model, epochs=EPOCHS, steps=4,
                  verbose=0)
    if list_class is keras.callbacks.CallbackList:
        # Keras 3's list lacks the `append` its docs show.
        callbacks = list_class(callbacks + [checkpoint], **params)
    else:
        callbacks = list_class(callbacks, executor=executor, **params)
        callbacks.append(checkpoint)
    callbacks.on_train_begin()
    logs = {}
    for epoch in range(EPOCHS):
        callbacks.on_epoch_begin(epoch)
        for i, data in dataset.enumerate():
            callbacks.on_train_batch_begin(i)
            logs = model.train_step(data)
            callbacks.on_train_batch_end(i, logs)
        callbacks.on_epoch_end(epoch, logs)
    callbacks.on_train_end(logs)
    return out, recorder, callbacks


def test_callbacklist_loop_matches_keras(tmp_path, executor):
    plain, plain_recorder, _ = _callbacklist_loop(
        keras.callbacks.CallbackList, tmp_path, "plain")
    ours, recorder, callbacks = _callbacklist_loop(
        AsyncCallbackList, tmp_path, "ours", executor)
    assert recorder.calls == plain_recorder.calls
    assert (ours / "log.csv").read_text() == (plain / "log.csv").read_text()
    assert len(assert_same_checkpoints(plain, ours)) == EPOCHS
    offloaded = [type(cb.callback).__name__ for cb in callbacks.callbacks
                 if isinstance(cb, AsyncCallback)]
    assert offloaded == ["CSVLogger", "ModelCheckpoint"]  # Auto, in order.


def _logging_callback():
    """The guide's logging callback (seed 003), from the example."""
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    sys.path.insert(0, examples)
    try:
        return importlib.import_module("gradient_tape_loop").CustomLoggingCallback()
    finally:
        sys.path.remove(examples)


def _gradient_tape_loop(callbacks_for, tmp_path, name):
    out = tmp_path / name
    out.mkdir()
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    loss_fn = keras.losses.BinaryCrossentropy()
    data = tf.data.Dataset.from_tensor_slices(
        ([[1.0], [2.0], [3.0], [4.0]], [0.0, 0.0, 1.0, 1.0])).batch(2)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(out / "{epoch}.weights.h5"), save_weights_only=True,
        monitor="loss")
    callbacks = callbacks_for([_logging_callback(), checkpoint], model)
    callbacks.on_train_begin()
    for epoch in range(3):
        callbacks.on_epoch_begin(epoch)
        epoch_loss = 0.0
        for step, (x_batch, y_batch) in enumerate(data):
            with tf.GradientTape() as tape:
                loss = loss_fn(y_batch, model(x_batch, training=True))
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            epoch_loss += loss
            callbacks.on_batch_end(step, {"loss": loss})
        callbacks.on_epoch_end(epoch, {"loss": epoch_loss / 2})
    callbacks.on_train_end()
    return out


def test_gradient_tape_loop_matches_keras(tmp_path, worker_output, executor):
    capsys = worker_output  # A worker process prints to the descriptor.
    plain = _gradient_tape_loop(
        lambda cbs, model: keras.callbacks.CallbackList(cbs, model=model),
        tmp_path, "plain")
    plain_out = capsys.readouterr().out
    ours = _gradient_tape_loop(
        lambda cbs, model: AsyncCallbackList(
            [AsyncCallback(cbs[0], executor=executor, state="none"), cbs[1]],
            model=model, executor=executor),
        tmp_path, "ours")
    assert capsys.readouterr().out == plain_out
    assert "Epoch 2: Loss = " in plain_out
    # The model was built on its first step, after the list got it: the
    # shadow was rebuilt from the built model, and the files match.
    assert len(assert_same_checkpoints(plain, ours)) == 3


def test_offload_auto_and_explicit(tmp_path):
    def builtins():
        return [keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras")),
                keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
                keras.callbacks.TensorBoard(str(tmp_path / "tb")),
                keras.callbacks.RemoteMonitor(),
                keras.callbacks.EarlyStopping(),
                keras.callbacks.ReduceLROnPlateau(),
                keras.callbacks.LambdaCallback()]

    auto = AsyncCallbackList(builtins())
    assert [isinstance(cb, AsyncCallback) for cb in auto.callbacks] == [
        True, True, True, True, False, False, False]
    explicit = AsyncCallbackList(builtins(), offload="explicit")
    assert not any(isinstance(cb, AsyncCallback) for cb in explicit.callbacks)


def test_history_progbar_and_summary(capsys, executor, tmp_path):
    model = make_model()
    callbacks = AsyncCallbackList(
        [keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))],
        add_history=True, add_progbar=True, model=model, executor=executor,
        epochs=EPOCHS, steps=4, verbose=1)
    x, y = mnist_like(128)
    history = model.fit(x, y, epochs=EPOCHS, batch_size=32,
                        callbacks=callbacks)
    assert history is model.history and history.epoch == [0, 1]
    out = capsys.readouterr().out
    assert "Epoch 2/2" in out and "4/4" in out  # Keras' progress bar.
    assert "asynccb: offloaded callbacks" in out  # Our summary, verbose=1.
    assert "CSVLogger" in out
    summary = callbacks.stats().summary()
    assert "CSVLogger" in summary and "ProgbarLogger" in summary


class Slow(keras.callbacks.Callback):
    """An epoch hook that does real, slow work (no sleeping)."""

    def on_epoch_end(self, epoch, logs=None):
        np.sort(np.random.default_rng(epoch).random(3_000_000))


def test_slow_synchronous_callback_warns_once():
    model = make_model()
    callbacks = AsyncCallbackList([Slow()], model=model, add_history=True)
    x, y = mnist_like(64)
    with pytest.warns(UserWarning) as caught:
        model.fit(x, y, epochs=3, batch_size=32, verbose=0,
                  callbacks=callbacks)
    ours = [w for w in caught if "AsyncCallback" in str(w.message)]
    assert len(ours) == 1
    assert str(ours[0].message).startswith("Slow.on_epoch_end took ")
    assert "Wrap it as AsyncCallback(Slow(...))" in str(ours[0].message)
    assert callbacks.stats().synchronous["Slow"].hook_time[
        "on_epoch_end"].count == 3


def test_fast_synchronous_callbacks_do_not_warn():
    model = make_model()
    callbacks = AsyncCallbackList([Recorder()], model=model, add_history=True)
    x, y = mnist_like(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                  callbacks=callbacks)


def test_deferred_control_stops_training_later(executor):
    x, y = mnist_like(128)
    never_improves = dict(monitor="loss", min_delta=1e9, patience=0)
    plain = make_model().fit(
        x, y, epochs=40, batch_size=32, verbose=0,
        callbacks=[keras.callbacks.EarlyStopping(**never_improves)])
    stopper = keras.callbacks.EarlyStopping(**never_improves)
    ours = make_model().fit(
        x, y, epochs=40, batch_size=32, verbose=0,
        callbacks=[AsyncCallback(stopper, executor=executor,
                                 deferred_control=True)])
    assert len(plain.epoch) == 2
    # Applied at a hook after the worker ran it: the same epoch or later.
    assert 2 <= len(ours.epoch) < 40
    assert stopper.stopped_epoch >= 1


def test_deferred_learning_rate_change(executor):
    model = make_model()
    reducer = keras.callbacks.ReduceLROnPlateau(
        monitor="loss", factor=0.5, patience=0, min_delta=1e9)
    x, y = mnist_like(128)
    model.fit(x, y, epochs=6, batch_size=32, verbose=0, callbacks=[
        AsyncCallback(reducer, executor=executor, deferred_control=True)])
    assert float(model.optimizer.learning_rate) < 1e-3


def test_list_reused_for_a_second_run(executor, tmp_path):
    """Keras does not set the model of a list passed to `fit` again; the
    offloaded callbacks still get a shadow (and saves their stand-in)."""

    class ModelIds(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ids = []

        def on_epoch_end(self, epoch, logs=None):
            self.ids.append(id(self.model))

    model = make_model()
    seen = ModelIds()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "{epoch}.keras"))
    callbacks = AsyncCallbackList(
        [AsyncCallback(seen, executor=executor, state="weights"), checkpoint],
        model=model, add_history=True, executor=executor)
    x, y = mnist_like(64)
    for _ in range(2):
        model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                  callbacks=callbacks)
        assert seen.model is model and checkpoint.model is model
    assert len(seen.ids) == 4 and id(model) not in seen.ids
    saves = callbacks.stats().callbacks["ModelCheckpoint"].worker_time["save"]
    assert saves.count == 4  # Both runs' saves ran in the worker.
