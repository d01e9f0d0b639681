"""Shared fixtures: small real Keras models, synthetic MNIST-shaped data,
and a check that every test leaves no thread of asynccb behind."""

from __future__ import annotations

import os
import sys
import threading

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two cores: keep TensorFlow from oversubscribing them with the workers.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

EXECUTORS = ["thread", "process", "async"]
JOIN_TIMEOUT_S = 20  # Failure guard only: threads end on events, not time.


def worker_processes() -> list[tuple[int, str]]:
    """This process' asynccb worker processes still alive."""
    from crossproc import children_of

    return [(pid, command) for pid, command in children_of(os.getpid())
            if "asynccb._executors.process.worker" in command]


def kept_segments() -> list[str]:
    """The segments this process keeps for its next runs, if any."""
    module = sys.modules.get("asynccb._executors.process.shared_memory")
    return module.kept_segments() if module is not None else []


def shared_segments(pid: int | None = None) -> list[str]:
    """asynccb's shared memory segments of process `pid` (default: us)."""
    prefix = f"asynccb-{pid or os.getpid()}-"
    return sorted(name for name in os.listdir("/dev/shm")
                  if name.startswith(prefix))


@pytest.fixture(autouse=True)
def nothing_left_behind(request):
    """Fails a test that leaves a thread, a worker process (but the one
    warm worker, shared by the tests) or a shared memory segment of
    asynccb behind.

    A run that raised past Keras' hooks is closed by the run watch within a
    fraction of a second; joining threads and waiting on process exits
    (with generous guards) waits for that without sleeping.
    """
    before = set(threading.enumerate())
    yield
    # The warm worker process and its threads outlive runs by design, and
    # so does the one countdown that gives back the snapshot memory kept
    # for the next run (a run restarts it: one at most, after the last).
    from asynccb._snapshot import kept_private

    counting = kept_private._idle.timer  # Current; others were cancelled.
    leaked = [t for t in threading.enumerate() if t not in before
              and not t.name.startswith("asynccb-pool") and t is not counting]
    if request.node.get_closest_marker("foreign_threads"):
        # Other libraries' threads (TensorFlow's async checkpointing,
        # Orbax) are theirs to stop: judge only asynccb's own.
        leaked = [t for t in leaked if t.name.startswith("asynccb")]
    for thread in leaked:
        thread.join(JOIN_TIMEOUT_S)
    alive = [t.name for t in leaked if t.is_alive()]
    assert not alive, f"threads left running: {alive}"
    assert len(worker_processes()) <= 1, "more than the warm worker"
    assert set(shared_segments()) <= set(kept_segments()), (
        "shared memory segments left (but those kept for the next run)")


def mnist_like(samples: int = 256, seed: int = 0):
    """Synthetic data of MNIST's shapes: 784 features, 10 classes."""
    rng = np.random.default_rng(seed)
    x = rng.random((samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, samples)
    return x, y


def regression_like(samples: int = 256, seed: int = 0):
    """The guide's setup: 784 features, a scalar target in 0..9."""
    x, y = mnist_like(samples, seed)
    return x, y.astype("float32")


@keras.saving.register_keras_serializable(package="asynccb_tests")
class Scale(keras.layers.Layer):
    """A custom layer with its own weight and config."""

    def __init__(self, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(input_shape[-1],), initializer="ones", name="scale"
        )

    def call(self, inputs):
        return inputs * self.scale * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class Subclassed(keras.Model):
    """A subclassed model with a custom layer, rebuilt from its config."""

    def __init__(self, units: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.scale = Scale(0.5)
        self.out = keras.layers.Dense(10)

    def call(self, inputs):
        return self.out(self.scale(self.hidden(inputs)))

    def get_config(self):
        return {"units": self.units, "name": self.name}


def make_model(kind: str = "sequential", seed: int = 1, units: int = 16):
    """A small compiled classifier on 784 features.

    Args:
        kind: `"sequential"`, `"functional"` or `"subclassed"`.
        seed: Initial weights seed, so two runs start identical.
        units: Hidden width.
    """
    keras.utils.set_random_seed(seed)
    if kind == "sequential":
        model = keras.Sequential([
            keras.Input((784,)),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.BatchNormalization(),
            Scale(2.0),
            keras.layers.Dense(10),
        ])
    elif kind == "functional":
        inputs = keras.Input((784,))
        hidden = keras.layers.Dense(units, activation="relu")(inputs)
        outputs = keras.layers.Dense(10)(Scale(0.5)(hidden))
        model = keras.Model(inputs, outputs)
    elif kind == "subclassed":
        model = Subclassed(units)
        model(np.zeros((1, 784), np.float32))  # Builds every sublayer.
    else:
        raise ValueError(kind)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def guide_model():
    """The guide's model: one Dense unit, RMSprop, MSE, MAE metric."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=0.1),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    return model


@pytest.fixture(params=EXECUTORS)
def executor(request):
    return request.param


@pytest.fixture
def worker_output(capfd):
    """`capfd`, with a worker process started under it: a warm worker
    prints where the test process' stdout was when it started, so the one
    left by an earlier test (printing into that test's capture) is retired
    first, and this one after the test."""
    import asynccb

    asynccb.shutdown()
    yield capfd
    asynccb.shutdown()


@pytest.fixture
def signals(tmp_path):
    """Makes cross-process gates (named pipes) in the test's directory."""
    from crossproc import Signal

    return lambda name: Signal(tmp_path / f"{name}.fifo")
