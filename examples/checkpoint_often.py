"""Train with a full checkpoint every few steps, plain Keras vs asynccb.

Trains the same model twice on synthetic MNIST-shaped data, each time
saving a `.keras` checkpoint (weights and optimizer state) every
`--save-every` steps plus a CSV log: once with plain Keras, once with the
same callbacks in an `AsyncCallbackList`. Prints the time of each run, what
asynccb saved, and checks that every checkpoint is identical to plain
Keras' and loads.

Run: python examples/checkpoint_often.py [--epochs 3] [--save-every 5]
"""

import argparse
import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf

from asynccb import AsyncCallbackList


def build_model(width):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(width, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def callbacks_in(directory, save_every):
    return [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "e{epoch:02d}-b{batch:03d}.keras"),
            save_freq=save_every),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
    ]


def same_tensors(a, b):
    left, right = keras.models.load_model(a), keras.models.load_model(b)
    return all(
        np.array_equal(x, y) for x, y in zip(
            left.get_weights() + [v.numpy() for v in left.optimizer.variables],
            right.get_weights() + [v.numpy() for v in right.optimizer.variables],
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40,
                        help="training steps per epoch")
    parser.add_argument("--save-every", type=int, default=5,
                        help="steps between checkpoints")
    parser.add_argument("--width", type=int, default=512,
                        help="hidden layer width (model size)")
    parser.add_argument("--directory", default=None)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    root = args.directory or tempfile.mkdtemp(prefix="asynccb-heavy-")
    rng = np.random.default_rng(0)
    x = rng.random((args.steps * 32, 784), dtype=np.float32)
    y = rng.integers(0, 10, args.steps * 32)
    fit = dict(epochs=args.epochs, batch_size=32, shuffle=False, verbose=0)

    times = {}
    for name in ("plain", "asynccb"):
        directory = os.path.join(root, name)
        os.makedirs(directory, exist_ok=True)
        model = build_model(args.width)
        callbacks = callbacks_in(directory, args.save_every)
        if name == "asynccb":
            callbacks = AsyncCallbackList(callbacks, add_history=True,
                                          model=model)
        start = time.perf_counter()
        model.fit(x, y, callbacks=callbacks, **fit)
        times[name] = time.perf_counter() - start
        if name == "asynccb":
            stats = callbacks.stats()

    size = sum(v.numpy().nbytes for v in model.weights + model.optimizer.variables)
    saved = sorted(f for f in os.listdir(os.path.join(root, "asynccb"))
                   if f.endswith(".keras"))
    same = all(
        same_tensors(os.path.join(root, "plain", f),
                     os.path.join(root, "asynccb", f)) for f in saved
    )
    print(f"model state: {size / 2**20:.1f} MiB (weights + Adam), "
          f"{len(saved)} checkpoints of it per run")
    print(f"plain Keras: {times['plain']:.2f} s   asynccb: "
          f"{times['asynccb']:.2f} s   "
          f"({times['plain'] / times['asynccb']:.2f}x)")
    print(f"asynccb saved {len(saved)} checkpoints in "
          f"{os.path.join(root, 'asynccb')}: {saved[0]} ... {saved[-1]}")
    print(f"every checkpoint equal to plain Keras' and loadable: {same}")
    print(stats)
    return same, stats


if __name__ == "__main__":
    main()
