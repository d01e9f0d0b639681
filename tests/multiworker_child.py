"""One worker of a two-worker MultiWorkerMirroredStrategy cluster on
loopback, running a hand-written loop that drives a callback list:
`multiworker_child.py MODE OUT_DIR [DIE]` with `TF_CONFIG` set (with
`DIE`, worker 1 SIGKILLs itself at the start of epoch 1).

MODE is `plain` (Keras' `CallbackList`) or `asynccb` (`AsyncCallbackList`,
which offloads the checkpoint and the CSV log). Keras 3's `fit` does not
run under this strategy (see the README); the seeds' custom loop does.
Every worker writes into `OUT_DIR/worker<index>/`; the last line of
stdout is a JSON report: the epochs run, the epoch EarlyStopping stopped
at, asynccb's threads seen during the run, its worker processes, its
stats.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [TESTS, os.path.join(os.path.dirname(TESTS), "examples")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
from conftest import make_model, mnist_like, worker_processes  # noqa: E402
from multi_worker import distributed_loop, train  # noqa: E402

EPOCHS = 4


class SeesThreads(keras.callbacks.Callback):
    """Records asynccb's threads alive at each epoch end."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def on_epoch_end(self, epoch, logs=None):
        self.seen |= {t.name for t in threading.enumerate()
                      if t.name.startswith("asynccb")}


class WorkerLocalLog(keras.callbacks.Callback):
    """Writes each epoch to a file of its worker's: needed on every
    worker, and declared so."""

    asynccb_every_worker = True

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch, logs=None):
        with open(self.path, "a") as file:
            file.write(f"{epoch}\n")


def main() -> None:
    mode, out, *die = sys.argv[1:]
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    directory = os.path.join(out, f"worker{index}")
    os.makedirs(directory)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = make_model()
    x, y = mnist_like(128)
    data, train_step = distributed_loop(strategy, model, x, y)

    seer = SeesThreads()
    stopper = keras.callbacks.EarlyStopping(monitor="loss", patience=1,
                                            min_delta=10.0)
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "e{epoch:02d}.weights.h5"),
            save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        stopper,
        seer,
    ]
    local_log = WorkerLocalLog(os.path.join(directory, "epochs.txt"))
    if mode == "asynccb":
        from asynccb import AsyncCallback, AsyncCallbackList

        callbacks = AsyncCallbackList(
            callbacks + [AsyncCallback(local_log, state="none")],
            model=model)
    else:
        callbacks.append(local_log)
        callbacks = keras.callbacks.CallbackList(callbacks, model=model)

    def die_in_epoch_1(epoch):
        if die and index == 1 and epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    epochs_run = train(callbacks, model, data, train_step, EPOCHS,
                       before_epoch=die_in_epoch_1)
    report = {"epochs_run": epochs_run, "stopped_epoch": stopper.stopped_epoch,
              "threads": sorted(seer.seen),
              "worker_processes": len(worker_processes())}
    if mode == "asynccb":
        stats = callbacks.stats()
        report["snapshots"] = stats.snapshots
        report["dispatched"] = {name: lane.dispatched
                                for name, lane in stats.callbacks.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
