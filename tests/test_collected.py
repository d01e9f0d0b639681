"""Nothing of a run outlives what the user keeps of it: after `fit`, the
model and the wrappers are collected as in plain Keras, whichever
executor ran them (a model per `fit`, in a notebook or a search loop,
must not pile up)."""

from __future__ import annotations

import gc
import weakref

import keras
import pytest
from conftest import make_model, mnist_like

from asynccb import AsyncCallback, AsyncCallbackList


def _callbacks(form: str, directory, model, executor: str):
    """ModelCheckpoint and BackupAndRestore (their saves offloaded, their
    decisions inline) and a CSVLogger (offloaded whole)."""
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(directory / "{epoch:02d}.keras"))
    backup = keras.callbacks.BackupAndRestore(str(directory / "backup"))
    csv_logger = AsyncCallback(
        keras.callbacks.CSVLogger(str(directory / "log.csv")),
        executor=executor)
    if form == "AsyncCallback":
        return [AsyncCallback(checkpoint, executor=executor),
                AsyncCallback(backup, executor=executor), csv_logger]
    # The list offloads the built-ins itself, and adopts the wrapper.
    return AsyncCallbackList([checkpoint, backup, csv_logger], model=model,
                             executor=executor, add_history=True)


@pytest.mark.parametrize("form", ["AsyncCallback", "AsyncCallbackList"])
def test_model_and_wrappers_are_collected_after_fit(tmp_path, executor, form):
    x, y = mnist_like(64)

    def run() -> list[weakref.ref]:
        model = make_model()
        callbacks = _callbacks(form, tmp_path, model, executor)
        model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                  callbacks=callbacks)
        assert (tmp_path / "02.keras").exists()
        wrappers = callbacks if isinstance(callbacks, list) else [callbacks]
        return [weakref.ref(model)] + [weakref.ref(w) for w in wrappers]

    references = run()
    gc.collect()
    alive = [ref() for ref in references if ref() is not None]
    assert not alive, f"still referenced after fit: {alive}"
