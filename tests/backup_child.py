"""A training process for the BackupAndRestore crash test, run as a script:
`backup_child.py BACKUP_DIR EXECUTOR STARTED GATE OUT_DIR`.

It backs up every epoch with an offloaded BackupAndRestore; the second
backup says so on STARTED and waits at GATE (never opened: the test kills
this process there). The weights at the end of each epoch go to
`OUT_DIR/weights-<epoch>.npz`, for the test to compare a restore with.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from conftest import mnist_like  # noqa: E402
from gated import gated_model  # noqa: E402

import asynccb  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


class RecordWeights(keras.callbacks.Callback):
    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def on_epoch_end(self, epoch, logs=None):
        np.savez(os.path.join(self.out_dir, f"weights-{epoch + 1}.npz"),
                 **{f"w{i}": w for i, w in
                    enumerate(self.model.get_weights())})


def main() -> None:
    backup_dir, executor, started, gate, out_dir = sys.argv[1:]
    model = gated_model(gate, started=started, free=1)
    backup = keras.callbacks.BackupAndRestore(backup_dir,
                                              delete_checkpoint=False)
    x, y = mnist_like(64)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, shuffle=False,
              callbacks=[RecordWeights(out_dir),
                         asynccb.AsyncCallback(backup, executor=executor)])


if __name__ == "__main__":
    main()
