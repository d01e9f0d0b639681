"""The model, the heavy callbacks, and the ways to run them (variants)."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from asynccb import AsyncCallback, AsyncCallbackList
from measure import (
    CheckpointClock,
    CopyFloor,
    SaveTimer,
    keras_file_arrays,
    model_arrays_as_keras_file,
)

# Hidden width of a 784-W-W-10 MLP, by preset. Weights are 4 bytes per
# parameter; Adam keeps two more copies: state = 3x weights.
PRESETS = {
    "10mb": 1200,    # 2.4 M parameters: 9.6 MB weights, 29 MB state.
    "100mb": 4600,   # 24.8 M: 99 MB weights, 0.3 GB state.
    "1gb": 8700,     # 82.6 M: 0.33 GB weights, 1.0 GB state.
    "3gb": 15400,    # 250 M: 1.0 GB weights, 3.0 GB state.
}


def build_model(width: int, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    # Fixed names: every run's checkpoint has the same paths inside, so
    # formats keyed by name (Orbax's state tree) compare across runs.
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(width, activation="relu", name="hidden1"),
        keras.layers.Dense(width, activation="relu", name="hidden2"),
        keras.layers.Dense(10, name="logits"),
    ], name="mlp")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4, name="adam"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def synthetic_data(samples: int, seed: int = 0):
    """MNIST's shapes: 784 features in [0, 1), labels 0..9."""
    rng = np.random.default_rng(seed)
    return (rng.random((samples, 784), dtype=np.float32),
            rng.integers(0, 10, samples))


class SanityCheck(keras.callbacks.Callback):
    """Predicts fixed samples at every epoch end and checks they are finite."""

    def __init__(self, samples: np.ndarray):
        super().__init__()
        self.samples = samples
        self.means: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.samples, verbose=0,
                                         batch_size=len(self.samples))
        if not np.isfinite(predictions).all():
            raise FloatingPointError(f"non-finite predictions, epoch {epoch}")
        self.means.append(float(predictions.mean()))


class TFCheckpoint(keras.callbacks.Callback):
    """What a new user writes to checkpoint with TensorFlow's own tools:
    a `tf.train.CheckpointManager`, saving every `every` steps, optionally
    with `CheckpointOptions(enable_async=True)`."""

    def __init__(self, directory: str, every: int, enable_async: bool):
        super().__init__()
        self.directory = directory
        self.every = every
        self.enable_async = enable_async
        self.step = 0

    def on_train_begin(self, logs=None):
        self.checkpoint = tf.train.Checkpoint(model=self.model,
                                              optimizer=self.model.optimizer)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, self.directory, max_to_keep=None)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.manager.save(
                checkpoint_number=self.step,
                options=tf.train.CheckpointOptions(
                    enable_async=self.enable_async))

    def on_train_end(self, logs=None):
        self.manager.sync()  # Wait for async saves: files complete.


@dataclass
class Config:
    width: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    save_every: int
    sanity_samples: int
    tensorboard: bool
    state_bytes: int = 0
    # Where runs keep training's threads (see `placement.placed`), unless
    # their variant says.
    threads: str = "free"


def _other_callbacks(directory: str, config: Config, x: np.ndarray):
    callbacks = [
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        SanityCheck(x[: config.sanity_samples]),
    ]
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(
            os.path.join(directory, "tb"), write_graph=False,
            update_freq="epoch", profile_batch=0))
    return callbacks


def _keras_checkpoint(directory: str, config: Config):
    return keras.callbacks.ModelCheckpoint(
        os.path.join(directory, "e{epoch:03d}b{batch:05d}.keras"),
        save_freq=config.save_every)


def _plain(checkpoint_factory):
    def build(directory, config, x, model):
        if checkpoint_factory is None:  # The other callbacks alone.
            return _other_callbacks(directory, config, x), None
        timer = SaveTimer(checkpoint_factory(directory, config),
                          config.save_every, after=config.steps_per_epoch,
                          floor=CopyFloor(config.state_bytes))
        return [timer] + _other_callbacks(directory, config, x), timer
    return build


class TimedList(AsyncCallbackList):
    """An `AsyncCallbackList` timed like `SaveTimer` times one callback:
    its `on_train_batch_end` at checkpoint steps is all its callbacks' work
    for that hook (the checkpoint's snapshot and queueing), its
    `on_train_end` the wait for the queues."""

    def __init__(self, *args, every: int, after: int = 0,
                 floor: CopyFloor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = CheckpointClock(every, after, floor)

    def on_train_batch_end(self, batch, logs=None):
        self.clock.batch_end(
            lambda: super(TimedList, self).on_train_batch_end(batch, logs))

    def on_train_end(self, logs=None):
        self.clock.train_end(lambda: super(TimedList, self).on_train_end(logs))


def _asynccb(executor: str | None, check_executor: str | None = None,
             checkpoint: bool = True, fast_saves: bool = True):
    """The same callbacks in an `AsyncCallbackList`, all on `executor` (or,
    with `None`, each on its kind's default executor); the sanity check is
    wrapped, declaring that it reads the weights only, on `check_executor`
    if given. Without `checkpoint`, the other callbacks alone; without
    `fast_saves`, every save through Keras' writer (as before fast
    saves)."""
    def build(directory, config, x, model):
        checkpoints = [_keras_checkpoint(directory, config)] if checkpoint else []
        callbacks = checkpoints + [
            AsyncCallback(cb, executor=check_executor or executor,
                          state="weights")
            if isinstance(cb, SanityCheck) else cb
            for cb in _other_callbacks(directory, config, x)
        ]
        timed = TimedList(callbacks, model=model, add_history=True,
                          executor=executor, fast_saves=fast_saves,
                          every=config.save_every,
                          after=config.steps_per_epoch,
                          floor=CopyFloor(config.state_bytes))
        return timed, timed
    return build


def _checkpoint_alone(executor: str | None):
    """ModelCheckpoint alone (full `.keras`): inline with `None`, else in
    an `AsyncCallback` on `executor`; timed like the other variants but
    without the memcpy floor, so that a run pays for the checkpoint only."""
    def build(directory, config, x, model):
        checkpoint = _keras_checkpoint(directory, config)
        if executor is not None:
            checkpoint = AsyncCallback(checkpoint, executor=executor)
        timer = SaveTimer(checkpoint, config.save_every,
                          after=config.steps_per_epoch)
        return [timer], timer
    return build


def _orbax(directory, config, x, model):
    timer = SaveTimer(keras.callbacks.OrbaxCheckpoint(
        os.path.join(directory, "orbax"), save_freq=config.save_every,
        max_to_keep=None, save_on_background=True), config.save_every,
        after=config.steps_per_epoch, floor=CopyFloor(config.state_bytes))
    return [timer] + _other_callbacks(directory, config, x), timer


def _none(directory, config, x, model):
    return [], None


@dataclass
class Variant:
    """A way to run the heavy callbacks.

    Attributes:
        name: Its name in the tables.
        build: `(directory, config, x, model) -> (callbacks, timer)`: what
            `fit` gets, and what timed the checkpointing hook (or `None`).
        requires: A module it needs; without it the row says so.
        note: What the row is.
        saves: Whether it writes checkpoints (its runs are then tagged
            with the save interval).
        placement: Where its runs keep training's threads
            (`placement.placed`): "free" (where the OS puts them),
            "apart" (where the process may use two CPUs or more), or
            `None`: as the benchmark's `Config.threads` says.
        in_all: Whether `--variants all` runs it.
    """

    name: str
    build: Callable
    requires: str | None = None
    note: str = ""
    saves: bool = True
    placement: str | None = None
    in_all: bool = True

    def missing(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"not installed ({self.requires}; pip install -e '.[bench]')"
        return None


# The baseline of every ratio. Its two busy threads run at one of two
# speeds, as the OS happens to place them for the run (together on one
# core: about 46 steps/s here; apart: 55-63): kept apart, it runs at the
# faster one every time, and a ratio to it does not depend on the draw.
NO_CALLBACKS = Variant("no callbacks", _none, saves=False,
                       placement="apart",
                       note="the limit: its threads kept on two CPUs")
# The same where the OS places it: the draw itself, when named.
NO_CALLBACKS_FREE = Variant("no callbacks (OS-placed)", _none, saves=False,
                            placement="free", in_all=False,
                            note="the limit, its threads where the OS "
                                 "puts them")

VARIANTS = [
    NO_CALLBACKS,
    NO_CALLBACKS_FREE,
    Variant("keras", _plain(_keras_checkpoint),
            note="the same callbacks in plain Keras"),
    Variant("asynccb defaults", _asynccb(None),
            note="checkpoint in a process, the rest in threads"),
    Variant("asynccb defaults + process check", _asynccb(None, "process"),
            in_all=False,
            note="the defaults, but the sanity check's predict in a "
                 "worker process"),
    # What the mix costs without its checkpoint: the part of every
    # variant's figure that no way of saving can win back.
    Variant("keras without checkpoint", _plain(None), saves=False, in_all=False,
            note="the other callbacks alone, in plain Keras"),
    Variant("asynccb defaults without checkpoint",
            _asynccb(None, checkpoint=False), saves=False, in_all=False,
            note="the other callbacks alone, on their default executors"),
    Variant("asynccb thread", _asynccb("thread")),
    Variant("asynccb process", _asynccb("process")),
    Variant("asynccb async", _asynccb("async")),
    # Each save through Keras' writer, as before fast saves: what they
    # gain, paired in the same run.
    *[Variant(f"asynccb {executor or 'defaults'} (fast off)",
              _asynccb(executor, fast_saves=False), in_all=False,
              note="fast_saves=False: every save through Keras' writer")
      for executor in (None, "thread", "process")],
    Variant("tf.train.Checkpoint", _plain(
        lambda d, c: TFCheckpoint(d, c.save_every, enable_async=False)),
        note="TensorFlow checkpoint, synchronous"),
    Variant("tf.train.Checkpoint async", _plain(
        lambda d, c: TFCheckpoint(d, c.save_every, enable_async=True)),
        note="CheckpointOptions(enable_async=True)"),
    Variant("keras OrbaxCheckpoint", _orbax, requires="orbax",
            note="OrbaxCheckpoint(save_on_background=True)"),
]


# The single-callback view: ModelCheckpoint and nothing else.
SINGLE_VARIANTS = [
    NO_CALLBACKS,
    NO_CALLBACKS_FREE,
    Variant("keras", _checkpoint_alone(None),
            note="ModelCheckpoint inline"),
] + [
    Variant(f"asynccb {executor}", _checkpoint_alone(executor),
            note=f"AsyncCallback(ModelCheckpoint, executor={executor!r})")
    for executor in ("thread", "process", "async")
]


# Verification: read each variant's checkpoints back, by global step.

_KERAS_NAME = re.compile(r"e(\d+)b(\d+)\.keras$")


def written_checkpoints(directory: str, steps_per_epoch: int) -> dict[int, str]:
    """Global step -> checkpoint path, for every format the variants use."""
    found: dict[int, str] = {}
    for name in os.listdir(directory):
        match = _KERAS_NAME.match(name)
        if match:
            epoch, batch = int(match[1]), int(match[2])
            found[(epoch - 1) * steps_per_epoch + batch] = os.path.join(
                directory, name)
        elif name.startswith("ckpt-") and name.endswith(".index"):
            found[int(name[5:-6])] = os.path.join(directory, name[:-6])
    orbax = os.path.join(directory, "orbax")
    if os.path.isdir(orbax):
        for name in os.listdir(orbax):
            if name.isdigit():
                found[int(name)] = os.path.join(orbax, name)
    return found


def keras_file_bytes(directory: str) -> int | None:
    """The median size of the `.keras` checkpoints in `directory`."""
    sizes = sorted(os.path.getsize(os.path.join(directory, name))
                   for name in os.listdir(directory)
                   if _KERAS_NAME.match(name))
    return sizes[len(sizes) // 2] if sizes else None


def checkpoint_arrays(path: str, width: int, scratch: str) -> list[np.ndarray]:
    """The checkpoint's state as a `.keras` file stores it."""
    if path.endswith(".keras"):
        return keras_file_arrays(path)
    model = build_model(width)
    model.optimizer.build(model.trainable_variables)
    if os.path.isdir(path):  # Orbax: a directory per step.
        import orbax.checkpoint as ocp

        state = ocp.StandardCheckpointer().restore(
            os.path.join(os.path.abspath(path), "pytree"))
        model.set_state_tree(state)
    else:
        tf.train.Checkpoint(model=model, optimizer=model.optimizer).restore(
            path).expect_partial()
    return model_arrays_as_keras_file(model, scratch)
