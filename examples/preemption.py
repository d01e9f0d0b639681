"""A preempted job: SIGTERM mid-training, and no checkpoint handed over lost.

On a preemptible machine the scheduler sends SIGTERM, waits a grace
period (about 30 s), then SIGKILL. This example starts a training process
(this script, with `--train`) that writes a full `.keras` checkpoint every
2 steps through asynccb, sends it SIGTERM once `--due` checkpoints were
handed over (their hooks returned to Keras), and reports how the process
ended (as plain Keras' would: killed by SIGTERM), how long it took from
SIGTERM to exit (asynccb finishing the queued saves), how many saves were
still queued when the signal came, and that every checkpoint handed over
is on disk and loads.

Run: python examples/preemption.py [--due 12] [--width 1024]
     [--executor process]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

SAVE_EVERY = 2


def train(directory: str, executor: str, width: int, due: int) -> None:
    """The training process: says `due <file>` for every checkpoint handed
    over, and `ready` at the `due`-th; training goes on until the signal."""
    import keras
    import numpy as np
    import tensorflow as tf

    from checkpoint_often import build_model  # The same MLP.

    from asynccb import AsyncCallback

    tf.config.threading.set_intra_op_parallelism_threads(1)

    class Announce(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.count = 0
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % SAVE_EVERY == 0:
                self.count += 1
                name = f"{self.epoch + 1:02d}-{batch + 1:04d}.keras"
                say = f"due {name}\n" + ("ready\n" if self.count == due
                                         else "")
                os.write(1, say.encode())

    model = build_model(width)
    checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(directory, "{epoch:02d}-{batch:04d}.keras"),
        save_freq=SAVE_EVERY)
    rng = np.random.default_rng(0)
    x = rng.random((SAVE_EVERY * 32 * 1000, 784), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    model.fit(x, y, batch_size=32, epochs=1, verbose=0,
              callbacks=[AsyncCallback(checkpoint, executor=executor),
                         Announce()])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--due", type=int, default=12,
                        help="checkpoints handed over before SIGTERM")
    parser.add_argument("--width", type=int, default=1024,
                        help="hidden width (1024: 28 MiB of state)")
    parser.add_argument("--executor", default="process")
    parser.add_argument("--directory", default=None)
    parser.add_argument("--train", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.train:
        train(args.train, args.executor, args.width, args.due)
        return {}

    import keras

    directory = args.directory or tempfile.mkdtemp(prefix="asynccb-preempt-")
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--train", directory,
         "--executor", args.executor, "--width", str(args.width),
         "--due", str(args.due)],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    due = []
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("due "):
            due.append(line[4:].strip())
        if line.strip() == "ready":
            break
    on_disk_at_signal = sum(name.endswith(".keras")
                            for name in os.listdir(directory))
    child.send_signal(signal.SIGTERM)
    signalled = time.perf_counter()
    rest, _ = child.communicate(timeout=120)
    seconds = time.perf_counter() - signalled
    due += [line[4:].strip() for line in rest.splitlines()
            if line.startswith("due ")]
    on_disk = sorted(name for name in os.listdir(directory)
                     if name.endswith(".keras"))
    for name in on_disk:
        keras.models.load_model(os.path.join(directory, name))
    status = child.returncode
    how = (f"killed by {signal.Signals(-status).name}" if status < 0
           else f"exit status {status}")
    print(f"training process: {how}, {seconds:.2f} s after SIGTERM")
    print(f"checkpoints handed over: {len(due)}; on disk when SIGTERM was "
          f"sent: {on_disk_at_signal}; on disk at exit: {len(on_disk)}, "
          f"all loading")
    missing = sorted(set(due) - set(on_disk))
    print(f"lost: {missing or 'none'} ({directory})")
    return {"status": status, "seconds": seconds, "due": due,
            "on_disk": on_disk, "on_disk_at_signal": on_disk_at_signal}


if __name__ == "__main__":
    main()
