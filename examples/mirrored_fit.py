"""`fit` under MirroredStrategy with offloaded callbacks: nothing to change.

Makes two logical CPU devices (a stand-in for two GPUs), trains the same
model under `tf.distribute.MirroredStrategy` with plain Keras callbacks
(`.keras` checkpoints per epoch, weights every 3 steps, a CSV log,
TensorBoard) and then with the same callbacks offloaded on each asynccb
executor asked for, and checks that every `.keras` checkpoint holds what
plain Keras' does.

Run: python examples/mirrored_fit.py [--executors thread,process,async]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

EXAMPLES = os.path.dirname(os.path.abspath(__file__))


def callbacks_in(directory: str) -> list:
    import keras

    return [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "{epoch:02d}.keras")),
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "{epoch:02d}-{batch:03d}.weights.h5"),
            save_weights_only=True, save_freq=3),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        keras.callbacks.TensorBoard(os.path.join(directory, "tb")),
    ]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--executors", default="thread,process,async")
    parser.add_argument("--directory", default=None)
    args = parser.parse_args(argv)

    import tensorflow as tf

    # Before TensorFlow sets up its devices: a fresh process.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import numpy as np

    sys.path.insert(0, EXAMPLES)
    from checkpoint_often import build_model, same_tensors

    from asynccb import AsyncCallback

    root = args.directory or tempfile.mkdtemp(prefix="asynccb-mirrored-")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    x = rng.random((256, 784), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    for variant in ["plain"] + args.executors.split(","):
        directory = os.path.join(root, variant)
        os.makedirs(directory)
        callbacks = callbacks_in(directory)
        if variant != "plain":
            callbacks = [AsyncCallback(cb, executor=variant)
                         for cb in callbacks]
        with strategy.scope():
            model = build_model(64)
        model.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False,
                  callbacks=callbacks)
        if variant != "plain":
            same = all(same_tensors(os.path.join(root, "plain", name),
                                    os.path.join(directory, name))
                       for name in ("01.keras", "02.keras"))
            print(f"{variant}: {len(os.listdir(directory))} files, "
                  f"checkpoints {'equal to' if same else 'DIFFERENT from'} "
                  f"plain Keras' under {strategy.num_replicas_in_sync} "
                  f"replicas")
    print(f"({root})")
    return root


if __name__ == "__main__":
    main()
