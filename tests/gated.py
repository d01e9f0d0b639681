"""A model whose saves wait at a gate, so that checkpoints pile up queued.

The gate is a `crossproc.Signal` (a named pipe, known by its path), so the
same model waits in a worker thread or a worker process, and a test (or
another process) opens it.
"""

from __future__ import annotations

import os

import keras
from conftest import JOIN_TIMEOUT_S
from crossproc import Signal


class Gain(keras.layers.Layer):
    """One weight, multiplied in: the smallest layer with state, for tests
    to hook its save code (see `GatedSave`, `crash_kinds.CrashingSave`)."""

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(input_shape[-1],),
                                    initializer="ones")

    def call(self, inputs):
        return inputs * self.gain


class GatedSave(Gain):
    """Its saves after the first `free` ones say so on `started` (with the
    saving process' pid) and wait, mid-file, until `gate` opens.

    Not registered with Keras: a worker process gets it from this module.
    Its own `save_own_variables` also sends its saves through Keras'
    writer (asynccb cannot prove what such code writes).
    """

    def __init__(self, gate=None, started=None, free=0, **kwargs):
        super().__init__(**kwargs)
        self.gate, self.started, self.free = gate, started, free
        self.saves = 0

    def save_own_variables(self, store):
        super().save_own_variables(store)
        self.saves += 1
        if self.saves <= self.free:
            return
        if self.started:
            Signal.attach(self.started).set(str(os.getpid()).encode())
        if self.gate:
            Signal.attach(self.gate).wait(JOIN_TIMEOUT_S)  # Guard only.

    def get_config(self):
        return {**super().get_config(), "gate": self.gate,
                "started": self.started, "free": self.free}


def gated_model(gate: str | None, **gating):
    """A small compiled classifier on 784 features, its saves gated
    (`gating`: `started`, `free`, see `GatedSave`)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((784,)), GatedSave(gate, **gating),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.
                  SparseCategoricalCrossentropy(from_logits=True))
    return model


def load_gated(path):
    """Loads a checkpoint of `gated_model` (its gate left closed: loading
    does not save)."""
    return keras.models.load_model(path,
                                   custom_objects={"GatedSave": GatedSave})
