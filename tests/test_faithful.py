"""Contract 1 and 7: a run with asynccb writes what plain Keras writes."""

from __future__ import annotations

import keras
import pytest
from artifacts import assert_same_checkpoints, tensorboard_scalars
from conftest import make_model, mnist_like, regression_like, guide_model

from asynccb import AsyncCallback, AsyncCallbackList

EPOCHS = 3
FIT = dict(epochs=EPOCHS, batch_size=32, validation_split=0.25,
           shuffle=False, verbose=0)

CHECKPOINTS = {
    "epoch_keras_pattern": lambda d: keras.callbacks.ModelCheckpoint(
        str(d / "{epoch:02d}-{val_loss:.2f}.keras")),
    "steps_weights": lambda d: keras.callbacks.ModelCheckpoint(
        str(d / "{epoch:02d}-{batch:03d}.weights.h5"),
        save_weights_only=True, save_freq=4),
    "best_val_loss_keras": lambda d: keras.callbacks.ModelCheckpoint(
        str(d / "best.keras"), monitor="val_loss", save_best_only=True),
    "best_weights": lambda d: keras.callbacks.ModelCheckpoint(
        str(d / "best.weights.h5"), monitor="val_accuracy",
        save_best_only=True, save_weights_only=True),
}


def _fit(tmp_path, name, make_callbacks, wrap, kind="sequential"):
    """Trains a fresh model with the callbacks `make_callbacks(dir)`.

    Args:
        wrap: `None` for plain Keras, or a function from the callbacks and
            the model to what `fit` receives.
    """
    out = tmp_path / name
    out.mkdir()
    callbacks = make_callbacks(out)
    model = make_model(kind)
    x, y = mnist_like()
    history = model.fit(
        x, y, callbacks=wrap(callbacks, model) if wrap else callbacks, **FIT
    )
    return out, callbacks, history, model


def _wrappers(executor):
    """The two ways to offload: wrap each callback, or pass our list (which,
    like Keras' own list passed to fit, brings its History and model)."""
    return {
        "AsyncCallback": lambda cbs, model: [
            AsyncCallback(cb, executor=executor) for cb in cbs],
        "AsyncCallbackList": lambda cbs, model: AsyncCallbackList(
            cbs, add_history=True, model=model, executor=executor),
    }


@pytest.mark.parametrize("form", ["AsyncCallback", "AsyncCallbackList"])
@pytest.mark.parametrize("checkpoint", sorted(CHECKPOINTS))
def test_model_checkpoint_bit_for_bit(tmp_path, executor, form, checkpoint):
    make = lambda d: [CHECKPOINTS[checkpoint](d)]  # noqa: E731
    plain, plain_cbs, plain_history, _ = _fit(tmp_path, "plain", make, None)
    wrap = _wrappers(executor)[form]
    ours, our_cbs, our_history, model = _fit(tmp_path, "ours", make, wrap)
    compared = assert_same_checkpoints(plain, ours)
    assert compared, "no checkpoint was written"
    # State copied back: `best` is on the user's object, as in plain Keras.
    assert our_cbs[0].best == plain_cbs[0].best
    assert our_cbs[0].model is model
    assert not [p for p in ours.iterdir() if p.name.startswith(".")]


def test_checkpoint_kinds_of_models(tmp_path, executor):
    """Sequential, functional and subclassed models with a custom layer."""
    for kind in ("functional", "subclassed"):
        make = lambda d: [keras.callbacks.ModelCheckpoint(  # noqa: E731
            str(d / "{epoch:02d}.keras"))]
        plain, *_ = _fit(tmp_path, f"plain-{kind}", make, None, kind)
        ours, *_ = _fit(tmp_path, f"ours-{kind}", make,
                        _wrappers(executor)["AsyncCallback"], kind)
        assert len(assert_same_checkpoints(plain, ours)) == EPOCHS


def test_csv_logger_and_history(tmp_path, executor, caplog):
    make = lambda d: [keras.callbacks.CSVLogger(str(d / "log.csv"))]  # noqa
    plain, _, plain_history, _ = _fit(tmp_path, "plain", make, None)
    for form, wrap in _wrappers(executor).items():
        ours, _, history, _ = _fit(tmp_path, f"ours-{form}", make, wrap)
        assert (ours / "log.csv").read_text() == (plain / "log.csv").read_text()
        assert history.history == plain_history.history
        assert history.epoch == plain_history.epoch
    # Its closed file cannot travel back from a worker process, and need
    # not: no warning says it did not.
    assert not any("stays as it was" in message
                   for message in caplog.messages), caplog.messages


def test_csv_logger_takes_no_snapshot(tmp_path, executor):
    make = lambda d: [keras.callbacks.CSVLogger(str(d / "log.csv"))]  # noqa
    lists = []

    def wrap(cbs, model):
        lists.append(AsyncCallbackList(cbs, add_history=True, model=model,
                                       executor=executor))
        return lists[-1]

    _fit(tmp_path, "ours", make, wrap)
    stats = lists[0].stats()
    assert list(stats.callbacks) == ["CSVLogger"]
    worker_time = stats.callbacks["CSVLogger"].worker_time
    assert worker_time["on_epoch_end"].count == EPOCHS
    assert worker_time["on_train_begin"].count == 1
    assert stats.snapshots == 0


def test_tensorboard_scalars(tmp_path, executor, caplog):
    pytest.importorskip("tensorboard")

    def make(d):
        return [keras.callbacks.TensorBoard(str(d / "tb"), histogram_freq=1)]

    plain, *_ = _fit(tmp_path, "plain", make, None)
    ours, *_ = _fit(tmp_path, "ours", make, _wrappers(executor)["AsyncCallback"])
    want = tensorboard_scalars(plain / "tb")
    got = tensorboard_scalars(ours / "tb")
    assert set(want) == {"train", "validation"}
    for run in want:
        assert sorted(got[run]) == sorted(want[run])  # Same tags and steps.
        for key, value in want[run].items():
            assert got[run][key] == pytest.approx(value), (run, key)
    # Its closed summary writers cannot travel back from a worker process,
    # and need not: no warning says they did not.
    assert not any("stays as it was" in message
                   for message in caplog.messages), caplog.messages


def test_early_stopping_beside_offloaded(tmp_path, executor):
    """EarlyStopping stays inline and stops at the same epoch."""
    x, y = regression_like()

    def run(name, wrap):
        out = tmp_path / name
        out.mkdir()
        stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=1)
        offloaded = [keras.callbacks.ModelCheckpoint(str(out / "{epoch}.keras")),
                     keras.callbacks.CSVLogger(str(out / "log.csv"))]
        if wrap:
            offloaded = [AsyncCallback(cb, executor=executor)
                         for cb in offloaded]
        model = guide_model()
        history = model.fit(x, y, batch_size=64, epochs=30,
                            shuffle=False, verbose=0,
                            callbacks=offloaded + [stopper])
        return out, stopper, history

    plain, plain_stopper, plain_history = run("plain", False)
    ours, stopper, history = run("ours", True)
    assert plain_stopper.stopped_epoch > 0, "the run should stop early"
    assert stopper.stopped_epoch == plain_stopper.stopped_epoch
    assert history.epoch == plain_history.epoch
    assert history.history == plain_history.history
    assert_same_checkpoints(plain, ours)
