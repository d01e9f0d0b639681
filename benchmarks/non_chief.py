"""What asynccb costs a worker that is not the chief of a cluster.

Under a multi-worker strategy only the chief does the offloaded work; on
the other workers asynccb must cost (almost) nothing. This process plays
such a worker (`TF_CONFIG` names it worker 1 of 2; no strategy is needed
to be told so) and times, on the training thread, `on_epoch_end` (a
checkpoint step) of an `AsyncCallbackList` holding an offloaded
ModelCheckpoint and CSVLogger plus an inline EarlyStopping, against Keras'
own `CallbackList` holding only that EarlyStopping: the difference is
asynccb's. Each repeat times both, interleaved, `--calls` calls each
(medians); reported: the median over repeats of the difference, with min
and max, and the snapshots asynccb took (must be 0).

The two-worker run itself is `examples/multi_worker.py` (its report
gives the same share, from a real cluster on loopback, but as a
difference of noisier medians).

Run from the repository root: python benchmarks/non_chief.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
    "task": {"type": "worker", "index": 1}})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _median_call_s(callbacks, calls: int, first_epoch: int) -> float:
    seconds = []
    for epoch in range(first_epoch, first_epoch + calls):
        start = time.perf_counter()
        callbacks.on_epoch_end(epoch, {"loss": 1.0})
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)

    import keras

    from asynccb import AsyncCallbackList

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss="mse")
    directory = tempfile.mkdtemp(prefix="asynccb-non-chief-")

    def stopper():
        return keras.callbacks.EarlyStopping(monitor="loss", patience=10**9)

    ours = AsyncCallbackList([
        keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "e{epoch}.weights.h5"),
            save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(directory, "log.csv")),
        stopper()], model=model)
    plain = keras.callbacks.CallbackList([stopper()], model=model)
    ours.on_train_begin()
    plain.on_train_begin()
    differences = []
    for repeat in range(args.repeats):
        first = repeat * args.calls
        differences.append(_median_call_s(ours, args.calls, first)
                           - _median_call_s(plain, args.calls, first))
    ours.on_train_end()
    plain.on_train_end()
    stats = ours.stats()
    result = {
        "asynccb_us_per_checkpoint_step": statistics.median(differences) * 1e6,
        "min_us": min(differences) * 1e6, "max_us": max(differences) * 1e6,
        "snapshots": stats.snapshots,
        "offloaded_calls": sum(lane.dispatched
                               for lane in stats.callbacks.values()),
        "files": os.listdir(directory),
    }
    print(f"non-chief worker: asynccb's time per checkpoint step on the "
          f"training thread {result['asynccb_us_per_checkpoint_step']:.1f} "
          f"us (min {result['min_us']:.1f}, max {result['max_us']:.1f}; "
          f"{args.repeats} repeats of {args.calls} calls, medians); "
          f"snapshots {result['snapshots']}, offloaded calls "
          f"{result['offloaded_calls']}, files written {result['files']}")
    return result


if __name__ == "__main__":
    main()
