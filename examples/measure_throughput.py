"""Measure what asynccb gains on your own training, with `stats()`.

Replace `build_model`, `load_data` and `make_callbacks` with yours. The
script trains twice from the same start: with your callbacks as they are,
then in an `AsyncCallbackList` (which offloads ModelCheckpoint, CSVLogger,
TensorBoard and RemoteMonitor by itself; wrap your own slow callbacks in
`AsyncCallback`). It prints the throughput of each run, measured after a
warm-up epoch, and what `stats()` says: per offloaded callback, what the
training thread paid per hook (snapshot + queueing) against what the worker
spent; per synchronous callback, its time on the training thread.

Run: python examples/measure_throughput.py [--epochs 4]
"""

import argparse
import os
import tempfile
import time

import keras
import numpy as np

from asynccb import AsyncCallbackList


def build_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(512, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def load_data():
    rng = np.random.default_rng(0)
    return rng.random((4096, 784), dtype=np.float32), rng.integers(0, 10, 4096)


def make_callbacks(directory):
    return [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "{epoch:02d}-{batch:04d}.keras"),
            save_freq=16),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        keras.callbacks.EarlyStopping(monitor="loss", patience=5),
    ]


class StepsPerSecond(keras.callbacks.Callback):
    """Steps per second after the first (warm-up) epoch, up to the end of
    `fit` (so including any wait for offloaded work at the end)."""

    def __init__(self):
        super().__init__()
        self.start = None
        self.steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if self.start is not None:
            self.steps += 1

    def rate(self, end):
        return self.steps / (end - self.start)


def run(offload, epochs, directory):
    model = build_model()
    x, y = load_data()
    meter = StepsPerSecond()
    callbacks = [meter] + make_callbacks(directory)
    if offload:
        callbacks = AsyncCallbackList(callbacks, add_history=True, model=model)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0,
              callbacks=callbacks)
    return meter.rate(time.perf_counter()), callbacks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args(argv)
    plain_rate, _ = run(False, args.epochs, tempfile.mkdtemp())
    rate, callbacks = run(True, args.epochs, tempfile.mkdtemp())
    print(f"plain Keras: {plain_rate:.1f} steps/s; with asynccb: "
          f"{rate:.1f} steps/s ({rate / plain_rate:.2f}x)")

    stats = callbacks.stats()
    print(stats)  # The readable table.
    for name, offloaded in stats.callbacks.items():
        worker = sum(t.total_s for t in offloaded.worker_time.values())
        trainer = offloaded.dispatch.total_s
        print(f"{name}: the training thread paid {trainer:.3f} s "
              f"(p50 {offloaded.dispatch.p50_s * 1e3:.2f} ms per hook, "
              f"{offloaded.blocked.total_s:.3f} s of it waiting on a full "
              f"queue) for {worker:.3f} s of work done in its "
              f"{offloaded.executor} worker")
    return plain_rate, rate, stats


if __name__ == "__main__":
    main()
