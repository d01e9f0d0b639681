"""Guarantee 1 in every combination a user can write: the faithfulness
matrix.

Each case trains (or evaluates, or predicts) once with plain Keras and once
with asynccb, the same seed, data and callbacks, and compares everything
they leave: every file (checkpoint tensors bit for bit, CSV and text bytes,
prediction arrays, TensorBoard events by tag, step and value, in-graph
summaries included), History, what each callback printed, in order, and
the epoch EarlyStopping stopped at.

Axes:
    executor: each offloaded callback of a case on its own executor,
        rotated across cases;
    api: callbacks wrapped in a plain list (`AsyncCallback`), an
        `AsyncCallbackList` that auto-offloads the built-ins (to their
        default executors), or one with `offload="explicit"`;
    model: Sequential; functional with a custom layer defined inside a
        function; subclassed (auto-named sublayers);
    entry: `fit` with validation data, `evaluate`, `predict`, the seeds'
        `tf.GradientTape` loop, two `fit` calls on the same callbacks.

Design: a pairwise covering array. Case (entry e, j) with j in 0..2 takes
api j, model (j + e) % 3 and executor rotation (j + 2e + 1) % 3, in
which callback kind k runs on executor (k + rotation) % 3. That covers
every pair of the four axes in 15 cases (5 entries x 3), and every pair of
(callback kind, executor) within the training entries (where every
callback acts), counting the built-ins that `list_auto` leaves to their
default executor; `test_the_design_covers_every_pair` checks both.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from artifacts import checkpoint_tensors, tensorboard_events
from conftest import Scale, mnist_like

import asynccb
from asynccb import AsyncCallback, AsyncCallbackList

pytest.importorskip("tensorboard")

EXECUTORS = ("thread", "process", "async")
APIS = ("plain_list", "list_auto", "list_explicit")
MODELS = ("sequential", "functional", "subclassed")
ENTRIES = ("fit", "evaluate", "predict", "tape_loop", "two_fits")
TRAINING_ENTRIES = ("fit", "tape_loop", "two_fits")
KINDS = ("checkpoint_epoch", "checkpoint_steps", "checkpoint_best", "csv",
         "tensorboard", "prediction_check", "lambda")
BUILT_IN_KINDS = KINDS[:5]

EPOCHS = 4  # EarlyStopping stops the training entries after 3.
BATCH = 32


def design() -> list[tuple[str, str, str, int]]:
    """The covering array: (entry, api, model, executor rotation)."""
    return [
        (entry, APIS[j], MODELS[(j + e) % 3], (j + 2 * e + 1) % 3)
        for e, entry in enumerate(ENTRIES) for j in range(3)
    ]


def executors_of(api: str, rotation: int) -> dict[str, str | None]:
    """Each kind's executor in a case; `None` for a built-in left to the
    list's auto-offload (its default executor)."""
    return {
        kind: None if api == "list_auto" and kind in BUILT_IN_KINDS
        else EXECUTORS[(k + rotation) % 3]
        for k, kind in enumerate(KINDS)
    }


def test_the_design_covers_every_pair():
    cases = design()
    assert len(cases) == 15
    for a, b in itertools.combinations(range(4), 2):
        levels = (ENTRIES, APIS, MODELS, range(3))
        seen = {(case[a], case[b]) for case in cases}
        assert seen == set(itertools.product(levels[a], levels[b]))
    from asynccb._roles import default_executor

    pairs = set()
    for entry, api, _, rotation in cases:
        if entry in TRAINING_ENTRIES:
            made = _make_callbacks(Path("/nonexistent"), True, entry, api)
            for kind, executor in executors_of(api, rotation).items():
                if kind in made:
                    pairs.add((kind, executor or default_executor(made[kind])))
    assert pairs == set(itertools.product(KINDS, EXECUTORS))


# Models: named, so TensorBoard tags (which hold model and layer names)
# are the same in both runs of a case.


@keras.saving.register_keras_serializable(package="asynccb_matrix")
class Summarize(keras.layers.Layer):
    """Writes a summary of its input from inside the model while training,
    as users do (TensorBoard records it on the training thread)."""

    def call(self, inputs, training=None):
        if training:
            tf.summary.scalar("mean_activation", tf.reduce_mean(inputs))
        return inputs


class MatrixSubclassed(keras.Model):
    """Sublayers named by Keras (a per-thread counter), as users write."""

    def __init__(self, units=16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.summarize = Summarize()
        self.scale = Scale(0.5)
        self.out = keras.layers.Dense(10)

    def call(self, inputs, training=None):
        hidden = self.summarize(self.hidden(inputs), training=training)
        return self.out(self.scale(hidden))

    def get_config(self):
        return {"units": self.units, "name": self.name}


def _functional_with_local_layer():
    class Shift(keras.layers.Layer):  # Defined here: travels by value.
        def build(self, input_shape):
            self.shift = self.add_weight(shape=(input_shape[-1],),
                                         initializer="zeros", name="shift")

        def call(self, inputs):
            return inputs + self.shift

    inputs = keras.Input((784,), name="pixels")
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    hidden = Summarize(name="summarize")(Shift(name="shift")(hidden))
    outputs = keras.layers.Dense(10, name="logits")(hidden)
    return keras.Model(inputs, outputs, name="functional_model")


def make_model(kind: str):
    # Both runs of a case name what Keras names (optimizers, input layers,
    # a subclassed model's sublayers) alike, as two fresh processes would.
    keras.utils.clear_session(free_memory=False)
    keras.utils.set_random_seed(7)
    if kind == "sequential":
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.BatchNormalization(name="norm"),
            Summarize(name="summarize"),
            Scale(2.0, name="scale"),
            keras.layers.Dense(10, name="logits"),
        ], name="sequential_model")
    elif kind == "functional":
        model = _functional_with_local_layer()
    else:
        model = MatrixSubclassed(name="subclassed_model")
        model(np.zeros((1, 784), np.float32))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


# Callbacks.


class PredictionCheck(keras.callbacks.Callback):
    """A sanity check on fixed inputs with `self.model.predict`: saves the
    predictions and prints their sum."""

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory
        self.probe = np.linspace(0, 1, 4 * 784, dtype=np.float32).reshape(
            4, 784)

    def _check(self, what: str) -> None:
        predictions = self.model.predict(self.probe, verbose=0)
        np.save(os.path.join(self.directory, f"check-{what}.npy"),
                predictions)
        _say(f"check {what}: {float(predictions.sum()):.6f}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(f"epoch{epoch}")

    def on_test_end(self, logs=None):
        self._check("test")

    def on_predict_end(self, logs=None):
        self._check("predict")


def _say(line: str) -> None:
    """Prints `line` in one write: `print` writes the text and the newline
    apart, so two callbacks printing at once on two workers could splice
    their lines (seen once in CI: "lambda epoch 0: ...check epoch0: ...")."""
    sys.stdout.write(line + "\n")


def _append(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


def _lambda(directory: str) -> keras.callbacks.LambdaCallback:
    batches = os.path.join(directory, "batches.txt")
    return keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: _say(
            f"lambda epoch {epoch}: loss={logs['loss']:.6f}"),
        on_train_batch_end=lambda batch, logs: _append(
            batches, f"{batch} {logs['loss']:.6f}"),
        on_test_end=lambda logs: _say(f"lambda test: {sorted(logs)}"),
        on_predict_end=lambda logs: _say("lambda predict"),
    )


def _make_callbacks(out: Path, validation: bool, entry: str = "fit",
                    api: str = "plain_list") -> dict:
    """The callbacks of a case, writing into `out`.

    Two `fit` calls are where plain Keras 3 itself fails with TensorBoard:
    per batch, it makes its writer the default for the model's own
    summaries, which the train function captures when traced, so the
    second `fit` writes to the first one's closed writer; and a reused
    `CallbackList` (which `fit` does not `set_model` again) keeps its
    closed writers. So there, TensorBoard writes per epoch, and is left
    out of the lists.
    """
    two_fits = entry == "two_fits"
    made = {
        "checkpoint_epoch": keras.callbacks.ModelCheckpoint(
            str(out / "epoch{epoch:02d}-{loss:.3f}.keras")),
        "checkpoint_steps": keras.callbacks.ModelCheckpoint(
            str(out / "step{epoch:02d}-{batch:03d}.weights.h5"),
            save_weights_only=True, save_freq=3),
        "checkpoint_best": keras.callbacks.ModelCheckpoint(
            str(out / "best.keras"), save_best_only=True, verbose=1,
            monitor="val_loss" if validation else "loss"),
        "csv": keras.callbacks.CSVLogger(str(out / "log.csv")),
        "tensorboard": keras.callbacks.TensorBoard(
            str(out / "tb"), histogram_freq=1,
            update_freq="epoch" if two_fits else "batch",
            write_graph=True),
        "prediction_check": PredictionCheck(str(out)),
        "lambda": _lambda(str(out)),
    }
    if two_fits and api != "plain_list":
        del made["tensorboard"]
    return made


def _control():
    """Inline beside the offloaded ones: stops after 3 epochs (the loss
    never improves by 1e9), halves the learning rate from the second."""
    return (
        keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9,
                                      patience=2),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=1e9,
                                          patience=0, factor=0.5),
    )


def _callbacks_for(out, model, entry, api, rotation, ours, validation):
    """What the entry hands to Keras, and the EarlyStopping in it."""
    made = _make_callbacks(out, validation, entry, api)
    early_stopping, reduce_lr = _control()
    executors = executors_of(api, rotation)
    if ours:
        for kind, executor in executors.items():
            if executor is not None and kind in made:
                made[kind] = AsyncCallback(made[kind], executor=executor)
    # List order matters: ReduceLROnPlateau adds `learning_rate` to the
    # logs that later callbacks see, not to those of earlier ones.
    callbacks = [made["checkpoint_epoch"], made["checkpoint_steps"],
                 made["csv"], reduce_lr, made["checkpoint_best"],
                 made.get("tensorboard"), made["prediction_check"],
                 made["lambda"], early_stopping]
    callbacks = [callback for callback in callbacks if callback is not None]
    if api == "plain_list":
        return callbacks, early_stopping
    if not ours:
        return keras.callbacks.CallbackList(
            callbacks, add_history=True, model=model), early_stopping
    offload = "auto" if api == "list_auto" else "explicit"
    return AsyncCallbackList(callbacks, add_history=True, model=model,
                             offload=offload), early_stopping


# Entries.


def _data():
    x, y = mnist_like(192, seed=3)
    return (x[:128], y[:128]), (x[128:], y[128:])


def _history(history) -> tuple:
    return history.epoch, history.history


def _tape_loop(model, callbacks, train, validation):
    """The seeds' hand-written loop: a GradientTape step per batch, a
    `CallbackList` driven by hand, stopping when a callback asks."""
    if isinstance(callbacks, list):
        callbacks = keras.callbacks.CallbackList(
            callbacks, add_history=True, model=model)
    dataset = tf.data.Dataset.from_tensor_slices(train).batch(BATCH)
    loss_fn = model.loss
    model.stop_training = False
    callbacks.on_train_begin()
    for epoch in range(EPOCHS):
        callbacks.on_epoch_begin(epoch)
        losses = []
        for step, (x, y) in enumerate(dataset):
            callbacks.on_train_batch_begin(step)
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(
                zip(gradients, model.trainable_variables))
            losses.append(float(loss))
            callbacks.on_train_batch_end(step, {"loss": float(loss)})
        val_loss = float(loss_fn(validation[1], model(validation[0])))
        callbacks.on_epoch_end(
            epoch, {"loss": float(np.mean(losses)), "val_loss": val_loss})
        if model.stop_training:
            break
    callbacks.on_train_end()
    return model.history.epoch, model.history.history


def _run(entry, model, callbacks):
    train, validation = _data()
    fit = dict(batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
               callbacks=callbacks)
    if entry == "fit":
        return _history(model.fit(*train, validation_data=validation, **fit))
    if entry == "two_fits":
        first = _history(model.fit(*train, **fit))
        return first, _history(model.fit(*train, validation_data=validation,
                                         **fit))
    if entry == "evaluate":
        return model.evaluate(*validation, batch_size=BATCH, verbose=0,
                              callbacks=callbacks, return_dict=True)
    if entry == "predict":
        return model.predict(validation[0], batch_size=BATCH, verbose=0,
                             callbacks=callbacks).tobytes()
    return _tape_loop(model, callbacks, train, validation)


PRINTERS = ("check", "lambda", "Epoch")  # What the callbacks print.


def _printed(text: str) -> dict[str, list[str]]:
    """What each callback printed, in order (one callback's lines keep
    their order; different callbacks may interleave)."""
    lines: dict[str, list[str]] = {}
    for line in text.splitlines():
        prefix = line.split(" ", 1)[0]
        if prefix in PRINTERS:
            lines.setdefault(prefix, []).append(line)
    return lines


def _files(out: Path) -> dict[str, object]:
    """Everything the run left, comparable across runs."""
    found: dict[str, object] = {}
    for path in sorted(out.rglob("*")):
        name = str(path.relative_to(out))
        if path.is_dir() or "tfevents" in path.name:
            continue
        if name.endswith((".keras", ".h5")):
            found[name] = {key: (value.dtype.str, value.tobytes())
                           for key, value in checkpoint_tensors(path).items()}
        else:
            found[name] = path.read_bytes()
    if (out / "tb").exists():
        found["tb events"] = tensorboard_events(out / "tb")
    return found


def _case(tmp_path, capfd, entry, api, model_kind, rotation, ours):
    out = tmp_path / ("ours" if ours else "plain")
    out.mkdir()
    model = make_model(model_kind)
    validation = entry in ("fit", "tape_loop")
    callbacks, early_stopping = _callbacks_for(
        out, model, entry, api, rotation, ours, validation)
    capfd.readouterr()
    result = _run(entry, model, callbacks)
    printed = _printed(capfd.readouterr().out.replace(str(out), "<out>"))
    return {
        "result": result,
        "stopped_epoch": early_stopping.stopped_epoch,
        "printed": printed,
        "files": _files(out),
    }


HEAVY_ENTRIES = ("two_fits", "tape_loop")


@pytest.mark.parametrize("entry, api, model_kind, rotation", [
    pytest.param(*case, id="-".join(map(str, case)),
                 marks=[pytest.mark.heavy] if case[0] in HEAVY_ENTRIES
                 else [])
    for case in design()
])
def test_matrix(tmp_path, capfd, entry, api, model_kind, rotation):
    if "process" in (executors_of(api, rotation)[kind]
                     for kind in ("prediction_check", "lambda")):
        # A warm worker prints where stdout was when it started: start one
        # under this test's capture (see `worker_output` in conftest).
        asynccb.shutdown()
    plain = _case(tmp_path, capfd, entry, api, model_kind, rotation, False)
    ours = _case(tmp_path, capfd, entry, api, model_kind, rotation, True)
    assert sorted(ours["files"]) == sorted(plain["files"])
    for name, content in plain["files"].items():
        if name == "tb events":
            assert sorted(ours["files"][name]) == sorted(content)
            for run, events in content.items():
                assert ours["files"][name][run] == events, run
        else:
            assert ours["files"][name] == content, name
    assert ours["printed"] == plain["printed"]
    assert ours["result"] == plain["result"]
    assert ours["stopped_epoch"] == plain["stopped_epoch"]
    if entry in TRAINING_ENTRIES:
        assert plain["stopped_epoch"] == 2, "the run should stop early"
        assert any(name.endswith(".keras") for name in plain["files"])
        if "tb events" in plain["files"]:
            events = plain["files"]["tb events"]["train"]
            assert any(plugin == "histograms" for _, _, plugin, _ in events)
            assert entry == "two_fits" or any(
                tag.endswith("mean_activation") for tag, *_ in events), (
                "no in-graph summary was recorded")
