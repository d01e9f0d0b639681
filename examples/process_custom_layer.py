"""Checkpoints and a sanity check in worker processes, for a custom layer
defined right here in the script.

`ScaledDense` is not registered with Keras and lives in `__main__`: asynccb
sends its class to the worker processes by value, so nothing more is
needed. Full-model checkpoints (`.keras`, with optimizer state) are written
every few steps, and a prediction sanity check runs each epoch, all in
worker processes: the training process only copies the model's state into
shared memory. Each checkpoint appears atomically.

Run: python examples/process_custom_layer.py [--epochs 3] [--save-every 10]
"""

import argparse
import os
import tempfile

import keras
import numpy as np

from asynccb import AsyncCallback, AsyncCallbackList


class ScaledDense(keras.layers.Layer):
    """A dense layer with a learned per-unit output scale."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(input_shape[-1], self.units), initializer="glorot_uniform")
        self.scale = self.add_weight(shape=(self.units,), initializer="ones")

    def call(self, inputs):
        return keras.ops.matmul(inputs, self.kernel) * self.scale

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class PredictionSanityCheck(keras.callbacks.Callback):
    """Fails the run if predictions on fixed samples become non-finite."""

    def __init__(self, samples):
        super().__init__()
        self.samples = samples
        self.checked = []

    def on_epoch_end(self, epoch, logs=None):
        predictions = self.model.predict(self.samples, verbose=0)
        if not np.isfinite(predictions).all():
            raise FloatingPointError(f"non-finite predictions at epoch {epoch}")
        self.checked.append(epoch)
        print(f"[worker {os.getpid()}] epoch {epoch}: predictions finite, "
              f"class counts {np.bincount(predictions.argmax(-1), minlength=10)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--directory", default=None)
    args = parser.parse_args(argv)
    directory = args.directory or tempfile.mkdtemp(prefix="asynccb-process-")

    rng = np.random.default_rng(0)
    x = rng.random((1024, 784), dtype=np.float32)
    y = rng.integers(0, 10, 1024)
    model = keras.Sequential([
        keras.Input((784,)),
        ScaledDense(64),
        keras.layers.ReLU(),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    check = PredictionSanityCheck(x[:128])
    callbacks = AsyncCallbackList(
        [
            keras.callbacks.ModelCheckpoint(
                os.path.join(directory, "e{epoch:02d}-b{batch:03d}.keras"),
                save_freq=args.save_every),
            AsyncCallback(check, executor="process", state="weights"),
        ],
        executor="process", add_history=True, model=model,
    )
    model.fit(x, y, epochs=args.epochs, batch_size=32, verbose=0,
              callbacks=callbacks)

    saved = sorted(f for f in os.listdir(directory) if f.endswith(".keras"))
    latest = keras.models.load_model(
        os.path.join(directory, saved[-1]),
        custom_objects={"ScaledDense": ScaledDense})
    print(f"{len(saved)} checkpoints in {directory}; the last loads: "
          f"{latest.layers[0].__class__.__name__} with "
          f"{latest.count_params()} parameters")
    print(f"sanity-checked epochs: {check.checked}")
    print(callbacks.stats())
    return saved, check


if __name__ == "__main__":
    main()
