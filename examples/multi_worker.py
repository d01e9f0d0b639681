"""Two workers on one machine: MultiWorkerMirroredStrategy, a hand-written
loop, and asynccb doing the offloaded work on the chief only.

Keras 3's `fit` does not run under MultiWorkerMirroredStrategy (see the
README), so each worker runs the guide's hand-written loop, with
`strategy.run` in a `tf.function`, driving an `AsyncCallbackList`. This
script starts two worker processes of itself on loopback (`TF_CONFIG`,
free ports on 127.0.0.1), each writing into `<directory>/worker<i>/`, and
prints what each did: the chief checkpoints and logs, the other worker
writes nothing and takes no snapshot, and EarlyStopping (inline on both)
stops both at the same epoch.

Run: python examples/multi_worker.py [--epochs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

GLOBAL_BATCH = 32


def distributed_loop(strategy, model, x, y):
    """The data, sharded per worker, and a `tf.function` step running one
    global batch on every replica; returns `(data, train_step)`."""
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none")

    def dataset(context):
        batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
        return tf.data.Dataset.from_tensor_slices((x, y)).shard(
            context.num_input_pipelines,
            context.input_pipeline_id).batch(batch)

    @tf.function
    def train_step(inputs):
        def step(features, labels):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(
                    loss_fn(labels, model(features, training=True)),
                    global_batch_size=GLOBAL_BATCH)
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(
                zip(gradients, model.trainable_variables))
            return loss

        losses = strategy.run(step, args=inputs)
        return strategy.reduce("SUM", losses, axis=None)

    return strategy.distribute_datasets_from_function(dataset), train_step


def train(callbacks, model, data, train_step, epochs, before_epoch=None,
          epoch_end_s=None):
    """The guide's loop: every hook, each epoch's mean loss in the logs;
    stops when a callback sets `model.stop_training`. Returns the number
    of epochs run; `epoch_end_s` (a list) gets each `on_epoch_end`'s
    seconds."""
    model.stop_training = False
    callbacks.on_train_begin()
    epochs_run = 0
    for epoch in range(epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        callbacks.on_epoch_begin(epoch)
        total, steps = 0.0, 0
        for step, inputs in enumerate(data):
            loss = float(train_step(inputs))
            total, steps = total + loss, steps + 1
            callbacks.on_train_batch_end(step, {"loss": loss})
        start = time.perf_counter()
        callbacks.on_epoch_end(epoch, {"loss": total / steps})
        if epoch_end_s is not None:
            epoch_end_s.append(time.perf_counter() - start)
        epochs_run += 1
        if model.stop_training:
            break
    callbacks.on_train_end()
    return epochs_run


def work(directory: str, epochs: int, patience: int) -> dict:
    """One worker: its part of the cluster's training (run with
    `TF_CONFIG` set)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from asynccb import AsyncCallbackList

    tf.config.threading.set_intra_op_parallelism_threads(1)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        keras.utils.set_random_seed(0)  # The same start on every worker.
        model = keras.Sequential([keras.Input((784,)),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10)])
        model.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    x = rng.random((256, 784), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    data, train_step = distributed_loop(strategy, model, x, y)
    stopper = keras.callbacks.EarlyStopping(monitor="loss",
                                            patience=patience, min_delta=0.5)
    callbacks = AsyncCallbackList([
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "e{epoch:02d}.weights.h5"),
            save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        stopper,
    ], model=model)
    epoch_end_s: list[float] = []
    epochs_run = train(callbacks, model, data, train_step, epochs,
                       epoch_end_s=epoch_end_s)
    stats = callbacks.stats()
    # asynccb's own share of the checkpoint step's hook (medians over the
    # epochs): the list's time less the synchronous callbacks'
    # (EarlyStopping).
    inline = sum(timing.p50_s for sync in stats.synchronous.values()
                 for hook, timing in sync.hook_time.items()
                 if hook == "on_epoch_end")
    return {"epochs_run": epochs_run, "stopped_epoch": stopper.stopped_epoch,
            "files": sorted(os.listdir(directory)),
            "snapshots": stats.snapshots,
            "offloaded_calls": {name: lane.dispatched
                                for name, lane in stats.callbacks.items()},
            "asynccb_ms_per_checkpoint": (
                statistics.median(epoch_end_s) - inline) * 1e3}


def free_ports(count: int) -> list[int]:
    """`count` ports free on 127.0.0.1 (for a cluster's workers)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--patience", type=int, default=1,
                        help="EarlyStopping's (it stops when the loss "
                             "falls by less than 0.5)")
    parser.add_argument("--directory", default=None)
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.worker, args.epochs, args.patience)))
        return []
    root = args.directory or tempfile.mkdtemp(prefix="asynccb-cluster-")
    cluster = {"worker": [f"127.0.0.1:{port}"
                          for port in free_ports(args.workers)]}
    workers = []
    for index in range(args.workers):
        directory = os.path.join(root, f"worker{index}")
        os.makedirs(directory, exist_ok=True)
        config = {"cluster": cluster,
                  "task": {"type": "worker", "index": index}}
        workers.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker",
             directory, "--epochs", str(args.epochs), "--patience",
             str(args.patience)],
            stdout=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": json.dumps(config),
                 "TF_CPP_MIN_LOG_LEVEL": "3"}))
    reports = []
    for index, worker in enumerate(workers):
        stdout, _ = worker.communicate(timeout=600)
        if worker.returncode:
            raise SystemExit(f"worker {index} failed ({worker.returncode})")
        report = json.loads(stdout.strip().splitlines()[-1])
        reports.append(report)
        print(f"worker {index}{' (chief)' if index == 0 else ''}: "
              f"{report['epochs_run']} epochs (EarlyStopping at "
              f"{report['stopped_epoch']}), files {report['files']}, "
              f"{report['snapshots']} snapshots, offloaded calls "
              f"{report['offloaded_calls']}, asynccb on the training "
              f"thread {report['asynccb_ms_per_checkpoint']:.3f} ms per "
              f"checkpoint step")
    print(f"({root})")
    return reports


if __name__ == "__main__":
    main()
