"""Warm workers: what a later `fit` and more callbacks cost on the process
executor.

Two measurements, on a small MLP with synthetic MNIST-shaped data:

- refit: `fit` called again and again (a notebook, a hyper-parameter loop)
  with two offloaded callbacks (a per-epoch `.keras` checkpoint and a CSV
  log), on the thread executor and on the process executor, interleaved:
  each repeat times one thread `fit` and one process `fit` back to back,
  after a first `fit` of each that is not measured (tracing, the worker's
  start). Reported: the median over repeats of (process - thread) wall
  seconds per `fit`, with min and max, and the CPU seconds of the training
  process and of the workers per `fit`.
- memory: the resident memory of asynccb's worker processes after a `fit`
  with 1 (a checkpoint) and with 4 process-offloaded callbacks (3
  checkpoints and a CSV log) on one wider model (`--memory-width`, so
  that its shadows weigh beside TensorFlow's own memory), each from no worker
  (`asynccb.shutdown()`), interleaved, repeated; in two forms: each
  callback wrapped in its own `AsyncCallback` (each wrapper takes its own
  snapshots, in buffers of its own) and all in one `AsyncCallbackList`
  (one snapshot per step, shared).

Run from the repository root: python benchmarks/warm_workers.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import descendants_cpu_and_rss  # noqa: E402


FORMS = {"wrappers": "an AsyncCallback each", "list": "one AsyncCallbackList"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--memory-width", type=int, default=2048,
                        help="hidden width of the memory runs' model")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra-op threads for training")
    return parser.parse_args(argv)


def _own_cpu() -> float:
    times = os.times()
    return times.user + times.system


def main(argv=None) -> dict:
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf

    import asynccb
    from asynccb import AsyncCallback

    tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.tf_threads)
    rng = np.random.default_rng(0)
    x = rng.random((512, 784), dtype=np.float32)
    y = rng.integers(0, 10, 512)

    def model(width=256):
        keras.utils.set_random_seed(1)
        m = keras.Sequential([keras.Input((784,)),
                              keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(10)])
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
        return m

    directory = tempfile.mkdtemp(prefix="asynccb-warm-")

    def callbacks(executor, count=2, form="wrappers", m=None):
        # `count` callbacks: a CSV log beside checkpoints, or (for one) a
        # checkpoint alone: what a shadow and snapshots cost shows in both.
        made = [keras.callbacks.ModelCheckpoint(
                    os.path.join(directory, f"{executor}-{i}.keras"))
                for i in range(max(count - 1, 1))]
        if count > 1:
            made.append(keras.callbacks.CSVLogger(
                os.path.join(directory, f"{executor}.csv")))
        if form == "list":
            return asynccb.AsyncCallbackList(made, model=m, add_history=True,
                                             executor=executor)
        return [AsyncCallback(cb, executor=executor) for cb in made]

    def fit(m, cbs):
        own, (workers, _) = _own_cpu(), descendants_cpu_and_rss()
        start = time.perf_counter()
        m.fit(x, y, epochs=args.epochs, batch_size=64, verbose=0,
              callbacks=cbs)
        wall = time.perf_counter() - start
        return (wall, _own_cpu() - own,
                descendants_cpu_and_rss()[0] - workers)

    # Refit: one model and one set of callbacks per executor, as a user
    # calling `fit` again in a notebook would have.
    runs = {name: (model(), callbacks(name)) for name in ("thread", "process")}
    for name, (m, cbs) in runs.items():
        print(f"first fit, {name}: {fit(m, cbs)[0]:.2f} s (not measured)",
              flush=True)
    pairs = []
    for repeat in range(args.repeats):
        thread = fit(*runs["thread"])
        process = fit(*runs["process"])
        pairs.append((thread, process))
        print(f"repeat {repeat + 1}/{args.repeats}: thread {thread[0]:.2f} s,"
              f" process {process[0]:.2f} s", flush=True)
    extra = [p[0] - t[0] for t, p in pairs]

    # Memory: worker RSS with 1 and 4 process callbacks, from no worker.
    memory = {(form, count): [] for form in FORMS for count in (1, 4)}
    state_mib = 0.0
    for repeat in range(args.memory_repeats):
        for form, count in memory:
            asynccb.shutdown()
            m = model(args.memory_width)
            state_mib = sum(v.numpy().nbytes for v in
                            m.weights) * 3 / 2**20  # Weights + Adam's two.
            m.fit(x, y, epochs=1, batch_size=64, verbose=0,
                  callbacks=callbacks("process", count, form, m))
            memory[form, count].append(descendants_cpu_and_rss()[1])
    asynccb.shutdown()

    def med(values):
        return statistics.median(values)

    result = {
        "tf_threads": args.tf_threads,
        "repeats": args.repeats,
        "refit_extra_s": {"median": med(extra), "min": min(extra),
                          "max": max(extra)},
        "thread_fit_s": med([t[0] for t, _ in pairs]),
        "process_fit_s": med([p[0] for _, p in pairs]),
        "thread_fit_cpu_s": med([t[1] + t[2] for t, _ in pairs]),
        "process_fit_cpu_s": med([p[1] + p[2] for _, p in pairs]),
        "process_fit_worker_cpu_s": med([p[2] for _, p in pairs]),
        "worker_rss_mib": {f"{form}, {count}": med(values) / 2**20
                           for (form, count), values in memory.items()},
        "memory_model_state_mib": state_mib,
    }
    print()
    print(f"TF threads {args.tf_threads}; {args.repeats} interleaved "
          f"repeats, medians (min-max).")
    print("| measure | value |")
    print("| --- | --- |")
    e = result["refit_extra_s"]
    print(f"| later fit, process minus thread | {e['median']:+.2f} s "
          f"({e['min']:+.2f} to {e['max']:+.2f}) |")
    print(f"| later fit wall, thread / process | "
          f"{result['thread_fit_s']:.2f} s / {result['process_fit_s']:.2f} s |")
    print(f"| later fit CPU (trainer + workers), thread / process | "
          f"{result['thread_fit_cpu_s']:.2f} s / "
          f"{result['process_fit_cpu_s']:.2f} s |")
    for form in FORMS:
        one, four = (result["worker_rss_mib"][f"{form}, {count}"]
                     for count in (1, 4))
        print(f"| worker RSS, 1 / 4 process callbacks ({FORMS[form]}), "
              f"model state {state_mib:.0f} MiB | {one:.0f} MiB / "
              f"{four:.0f} MiB ({four / one:.2f}x) |")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
