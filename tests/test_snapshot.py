"""Contract 4 and 5: an offloaded hook sees the model as it was when the
hook was called, through a snapshot shared by the callbacks of that hook."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import make_model, mnist_like

from asynccb import AsyncCallback, AsyncCallbackList
from asynccb._snapshot import (
    Snapshot,
    StateLayout,
    StateLevel,
    allocate_held,
    allocate_private,
    state_variables,
)


def weights_layout(model) -> StateLayout:
    return StateLayout(StateLevel.WEIGHTS,
                       state_variables(model, StateLevel.WEIGHTS))


class SeesWeights(keras.callbacks.Callback):
    """Records, per (epoch, batch), the weights its `self.model` holds."""

    def __init__(self):
        super().__init__()
        self.epoch = None
        self.seen = {}
        self.iterations = {}
        self.models = set()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.seen[(self.epoch, batch)] = self.model.get_weights()
        self.iterations[(self.epoch, batch)] = int(
            self.model.optimizer.iterations.numpy())
        self.models.add(id(self.model))


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_each_hook_sees_its_own_step(executor, kind):
    offloaded = SeesWeights()
    live = SeesWeights()  # Inline: the truth.
    x, y = mnist_like(128)
    model = make_model(kind)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[
        live, AsyncCallback(offloaded, executor=executor, state="weights"),
    ])
    assert sorted(offloaded.seen) == sorted(live.seen)
    for key, weights in live.seen.items():
        assert offloaded.iterations[key] == live.iterations[key]
        for got, want in zip(offloaded.seen[key], weights):
            np.testing.assert_array_equal(got, want)
    assert id(model) not in offloaded.models  # A shadow, never the model.
    assert offloaded.model is model  # And the live model back afterwards.


class Reads(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.kernels = {}

    def on_epoch_end(self, epoch, logs=None):
        self.kernels[epoch] = self.model.get_weights()[0]


def test_callbacks_of_one_hook_share_a_snapshot(executor):
    first, second = Reads(), Reads()
    model = make_model()
    callbacks = AsyncCallbackList([
        AsyncCallback(first, executor=executor, state="weights"),
        AsyncCallback(second, executor=executor, state="weights"),
    ], model=model, add_history=True)
    x, y = mnist_like(128)
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=callbacks)
    stats = callbacks.stats()
    assert stats.snapshots == 3  # One per epoch end, not one per callback.
    for epoch in range(3):
        np.testing.assert_array_equal(first.kernels[epoch],
                                      second.kernels[epoch])


def test_a_synchronous_change_between_them_takes_a_new_snapshot(executor):
    class Zeroes(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kernel = self.model.weights[0]
            kernel.assign(np.zeros(kernel.shape, "float32"))

    before, after = Reads(), Reads()
    model = make_model()
    callbacks = AsyncCallbackList([
        AsyncCallback(before, executor=executor, state="weights"),
        Zeroes(),
        AsyncCallback(after, executor=executor, state="weights"),
    ], model=model, add_history=True)
    x, y = mnist_like(128)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    assert callbacks.stats().snapshots == 4
    for epoch in range(2):
        assert np.any(before.kernels[epoch] != 0)
        assert not np.any(after.kernels[epoch])


def test_hooks_that_need_no_state_take_no_snapshot(tmp_path, executor):
    model = make_model()
    reads = Reads()
    callbacks = AsyncCallbackList([
        keras.callbacks.CSVLogger(str(tmp_path / "log.csv")),
        AsyncCallback(reads, executor=executor, state={"on_epoch_end": "none"}),
    ], model=model, add_history=True, executor=executor)
    x, y = mnist_like(128)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    stats = callbacks.stats()
    assert stats.snapshots == 0 and stats.buffers == 0
    assert set(stats.callbacks) == {"CSVLogger", "Reads"}


def test_snapshot_buffers_are_reused(tmp_path, executor):
    model = make_model()
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{epoch:02d}-{batch:03d}.keras"), save_freq=1)
    callbacks = AsyncCallbackList([checkpoint], model=model, add_history=True,
                                  executor=executor, max_snapshots=2)
    x, y = mnist_like(128)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    stats = callbacks.stats()
    assert stats.snapshots == 8
    assert 1 <= stats.buffers <= 2
    assert len(list(tmp_path.glob("*.keras"))) == 8
    pool = callbacks._dispatcher.pool
    assert pool.allocations <= 2  # Reused, not allocated per snapshot.
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    assert callbacks.stats().snapshots == 16
    assert pool.allocations <= 4  # Freed at the end of a run, then reused.


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_building_a_shadow_leaves_the_blueprint_intact(kind):
    """One blueprint serves every lane of a list: a thread lane building its
    shadow must not consume what a process lane sends later (Keras'
    `from_config` pops a functional model's layers out of its config)."""
    import copy

    from asynccb._shadow import ModelBlueprint

    blueprint = ModelBlueprint.of(make_model(kind))
    before = copy.deepcopy(blueprint.config)
    blueprint.build()
    assert blueprint.config == before
    blueprint.build()  # And it builds again.


def test_thread_and_process_lanes_share_a_functional_model(tmp_path):
    """The reported failure: a prediction check on a thread beside
    auto-offloaded checkpoints (process) in one list, functional model."""
    from artifacts import assert_same_checkpoints

    class Check(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.sums = []

        def on_epoch_end(self, epoch, logs=None):
            x = np.ones((2, 784), np.float32)
            self.sums.append(float(self.model.predict(x, verbose=0).sum()))

    x, y = mnist_like(128)
    runs = {}
    for name in ("plain", "ours"):
        out = tmp_path / name
        out.mkdir()
        model = make_model("functional")
        check = Check()
        callbacks = [check, keras.callbacks.ModelCheckpoint(
            str(out / "{epoch}.keras"))]
        if name == "ours":
            callbacks = AsyncCallbackList(
                [AsyncCallback(check, executor="thread"), callbacks[1]],
                add_history=True, model=model)
        model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                  callbacks=callbacks)
        runs[name] = (out, check.sums)
    assert len(assert_same_checkpoints(runs["plain"][0], runs["ours"][0])) == 2
    assert runs["ours"][1] == runs["plain"][1]


class CountsBuilds(keras.layers.Layer):
    """A layer that appends its process id to a file each time it is made:
    one line for the live model, one per shadow built from it."""

    def __init__(self, log: str, **kwargs):
        super().__init__(**kwargs)
        self.log = log
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")

    def call(self, inputs):
        return inputs

    def get_config(self):
        return {**super().get_config(), "log": self.log}


def test_checkpoints_of_one_model_share_a_shadow(tmp_path, executor):
    """Two checkpoints of one model, each wrapped on its own (two
    dispatchers): their worker builds the model once, and each file holds
    its own step's weights."""
    log = tmp_path / "builds.txt"
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((784,)), keras.layers.Dense(8), CountsBuilds(str(log)),
        keras.layers.Dense(10)])
    model.compile("adam", "sparse_categorical_crossentropy")
    # Built now, so the shadow made at `set_model` is the one saves use
    # (else a second is built once the first step builds the optimizer).
    model.optimizer.build(model.trainable_variables)
    epochs = keras.callbacks.ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))
    steps = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "s{epoch}-{batch}.weights.h5"), save_freq=3,
        save_weights_only=True)
    seen = {}

    def record(epoch, logs):
        seen[epoch] = model.get_weights()

    x, y = mnist_like(128)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[
        AsyncCallback(epochs, executor=executor),
        AsyncCallback(steps, executor=executor),
        keras.callbacks.LambdaCallback(on_epoch_end=record),
    ])
    builds = log.read_text().split()
    assert builds[0] == str(os.getpid())  # The live model.
    assert len(builds) == 2, builds  # One shadow for both callbacks.
    for epoch in (1, 2):
        saved = keras.saving.load_model(tmp_path / f"e{epoch}.keras",
                                        custom_objects={"CountsBuilds":
                                                        CountsBuilds})
        for got, want in zip(saved.get_weights(), seen[epoch - 1]):
            np.testing.assert_array_equal(got, want)
    assert len(list(tmp_path.glob("s*.weights.h5"))) == 2  # Steps 3 and 6.


def test_a_shared_shadow_copies_a_snapshot_it_holds_only_once():
    """Shared (saving lanes, no user code holds it): a snapshot applied
    for one lane is not copied again for the next. Private (a callback's
    own, which it may have changed since): always copied."""
    from asynccb._shadow import ModelBlueprint, Shadow

    model = make_model()
    layout = weights_layout(model)
    buffer = allocate_private(layout.nbytes)
    layout.capture(buffer)
    blueprint = ModelBlueprint.of(model)
    shadow = Shadow(blueprint, shared=True)

    def snapshot():
        return Snapshot(StateLevel.WEIGHTS, layout.spec, buffer, None, False)

    first = snapshot()
    kernel = shadow.apply(first).weights[0]
    np.testing.assert_array_equal(kernel.numpy(), model.weights[0].numpy())
    kernel.assign(np.zeros(kernel.shape, np.float32))  # Not from a snapshot.
    shadow.apply(first)  # Held already: not copied again.
    assert not kernel.numpy().any()
    shadow.apply(snapshot())  # A new snapshot (same bytes) is copied.
    np.testing.assert_array_equal(kernel.numpy(), model.weights[0].numpy())

    own = Shadow(blueprint)
    kernel = own.apply(first).weights[0]
    kernel.assign(np.zeros(kernel.shape, np.float32))  # Its callback's.
    own.apply(first)
    np.testing.assert_array_equal(kernel.numpy(), model.weights[0].numpy())


def test_a_held_value_is_let_go_of_only_by_its_only_holder():
    model = make_model()
    layout = weights_layout(model)
    snapshot = Snapshot(StateLevel.WEIGHTS, layout.spec, allocate_held(0),
                        None, False, held=layout.hold()).retain()
    snapshot.retain()  # A second lane saving the same step.
    snapshot.let_go_of(0)
    np.testing.assert_array_equal(snapshot.arrays()[0],
                                  model.weights[0].numpy())
    snapshot.release()  # The other lane is done.
    snapshot.let_go_of(0)
    assert snapshot.arrays()[0] is None
    np.testing.assert_array_equal(snapshot.arrays()[1],
                                  model.weights[1].numpy())


def test_a_layout_per_fit_warns_of_no_retracing():
    # Each fit lays its state out anew, with a reader of its own. Read
    # through `tf.function`, those first calls counted as retracing of one
    # function, and TensorFlow warned from the fifth fit on. A fresh
    # interpreter: TensorFlow warns at most a few times per process.
    code = textwrap.dedent("""
        import logging
        import keras
        from asynccb._snapshot import (
            StateLayout, StateLevel, allocate_private, state_variables)

        warnings = []
        handler = logging.Handler()
        handler.emit = warnings.append
        logging.getLogger("tensorflow").addHandler(handler)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        for _ in range(8):
            layout = StateLayout(StateLevel.WEIGHTS, state_variables(
                model, StateLevel.WEIGHTS))
            layout.hold()
            layout.capture(allocate_private(layout.nbytes))
        print("warnings:", [w.getMessage()[:60] for w in warnings])
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warnings: []" in done.stdout, done.stdout


class WaitsAtFirstStep(keras.callbacks.Callback):
    """Offloaded: its first hook waits until training is `steps` further,
    then records the weights its model holds."""

    def __init__(self, released):
        super().__init__()
        self.released = released
        self.seen = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            assert self.released.wait(60), "training never got further"
            self.seen = self.model.get_weights()


class ReleasesAt(keras.callbacks.Callback):
    """Inline: records the live weights at step 0, releases at `step`."""

    def __init__(self, released, step):
        super().__init__()
        self.released, self.step = released, step
        self.at_first_step = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.at_first_step = self.model.get_weights()
        if batch == self.step:
            self.released.set()


@pytest.mark.parametrize("executor_", ["thread", "async"])
def test_a_held_snapshot_stays_the_state_at_dispatch(executor_):
    import threading

    released = threading.Event()
    waits, releases = WaitsAtFirstStep(released), ReleasesAt(released, 5)
    wrapper = AsyncCallback(waits, executor=executor_, state=lambda hook, args: (
        "weights" if args == (0,) else "none"))
    model = make_model()
    x, y = mnist_like(256)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0,
              callbacks=[releases, wrapper])
    live_now = model.get_weights()
    assert any(not np.array_equal(a, b)
               for a, b in zip(live_now, releases.at_first_step))
    for got, want in zip(waits.seen, releases.at_first_step):
        np.testing.assert_array_equal(got, want)
    # Workers in this process hold what TensorFlow read: nothing copied.
    assert wrapper._dispatcher.snapshot_bytes == 0


class RemembersItsModel(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        import weakref

        self.shadow = weakref.ref(self.model)


def test_a_large_shadow_is_freed_when_its_run_ends(monkeypatch):
    """A Keras model holds reference cycles: without a collection at the
    end of the run, its shadow's memory would wait for Python's cycle
    collector (each run of a large model would add one)."""
    import asynccb._tasks

    monkeypatch.setattr(asynccb._tasks, "COLLECT_SHADOWS_FROM", 0)
    remembers = RemembersItsModel()
    x, y = mnist_like(64)
    make_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[
        AsyncCallback(remembers, executor="thread", state="weights")])
    assert remembers.shadow() is None
