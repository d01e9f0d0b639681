"""Callbacks that record what they see, for order and consistency tests."""

from __future__ import annotations

import os
import threading

import keras

from asynccb._hooks import ALL_HOOKS, BATCH_HOOKS, EPOCH_HOOKS


class Recorder(keras.callbacks.Callback):
    """Records every call it receives: `(hook, index, sorted log keys)`.

    Also records where each hook ran: (process id, thread name).
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.threads: set[tuple[int, str]] = set()

    def set_model(self, model):
        super().set_model(model)
        self.calls.append(("set_model",))

    def set_params(self, params):
        super().set_params(params)
        self.calls.append(("set_params", tuple(sorted(params))))


def _recording_hook(hook):
    if hook in BATCH_HOOKS or hook in EPOCH_HOOKS:
        def method(self, index, logs=None):
            self.threads.add((os.getpid(), threading.current_thread().name))
            self.calls.append((hook, int(index), tuple(sorted(logs or {}))))
    else:
        def method(self, logs=None):
            self.threads.add((os.getpid(), threading.current_thread().name))
            self.calls.append((hook, None, tuple(sorted(logs or {}))))
    method.__name__ = hook
    return method


for _hook in ALL_HOOKS:
    setattr(Recorder, _hook, _recording_hook(_hook))


class Gated(keras.callbacks.Callback):
    """Blocks in `on_epoch_end` until its gate opens; records epochs done.

    Args:
        gate: The gate to wait on (a `crossproc.Signal`, which also works
            in a worker process).
        started: Set when the first gated hook starts, if given.
        gated_epochs: The epochs that wait (default: all).
        timeout: Failure guard, so a broken test fails instead of hanging.
    """

    def __init__(self, gate, gated_epochs=None, timeout=60, started=None):
        super().__init__()
        self.gate = gate
        self.started = started
        self.gated_epochs = gated_epochs
        self.timeout = timeout
        self.done: list[int] = []
        self.weights: dict[int, list] = {}

    def on_epoch_end(self, epoch, logs=None):
        if self.gated_epochs is None or epoch in self.gated_epochs:
            if self.started is not None:
                self.started.set()
            assert self.gate.wait(self.timeout), "gate never opened"
        if self.model is not None:
            self.weights[epoch] = self.model.get_weights()
        self.done.append(epoch)


class LiveWeights(keras.callbacks.Callback):
    """Records the live model's weights at every epoch end (inline)."""

    def __init__(self):
        super().__init__()
        self.weights: dict[int, list] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = self.model.get_weights()


class OnTrainEnd(keras.callbacks.Callback):
    """Runs a function at `on_train_end`, inline."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def on_train_end(self, logs=None):
        self.function()


class WaitsAtEpochBegin(keras.callbacks.Callback):
    """Inline: at `on_epoch_begin(epoch)`, waits for `signal` (so a worker
    is known to be busy before training goes on)."""

    def __init__(self, signal, epoch=1, timeout=60):
        super().__init__()
        self.signal = signal
        self.epoch = epoch
        self.timeout = timeout

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            assert self.signal.wait(self.timeout), "signal never set"
