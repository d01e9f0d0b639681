"""Running the variants (interleaved, repeated, verified) and the sweep."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import keras

from asynccb import AsyncCallback
from asynccb._executors.process.shared_memory import allocate_shared
from asynccb._snapshot import (
    StateLayout,
    StateLevel,
    allocate_private,
    state_variables,
)
from placement import placed
from measure import (
    CopyFloor,
    PeakMemory,
    SaveTimer,
    Window,
    cpu_probe,
    descendants_cpus,
    memcpy_seconds,
    percentile,
    same_arrays,
    state_nbytes,
)
from variants import (
    Config,
    Variant,
    TimedList,
    build_model,
    checkpoint_arrays,
    keras_file_bytes,
    synthetic_data,
    written_checkpoints,
)

REFERENCE = "keras"
WARMUP_EPOCHS = 1


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def parameters_of(width: int) -> int:
    return 784 * width + width + width * width + width + width * 10 + 10


def state_bytes_of(width: int) -> int:
    """Weights plus Adam's two moments, float32, plus two scalars."""
    return 3 * 4 * parameters_of(width) + 8 + 4


def width_for_state(nbytes: int) -> int:
    """The hidden width whose state (weights + Adam) is about `nbytes`."""
    parameters = nbytes / 12
    return max(8, round((-796 + math.sqrt(796 ** 2 + 4 * parameters)) / 2))


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _error(exc: BaseException) -> str:
    """A one-line account of `exc` for a table row: its message, or, for
    TensorFlow's multi-line 'in user code' errors, the root cause's."""
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    cause = text.rsplit(f"{name}: ", 1)[-1]
    return f"error: {name}: {cause}"[:150]


def _slug(variant: Variant, every: int | None, repeat: int) -> str:
    name = variant.name.replace(" ", "-").replace(".", "")
    return f"{name}-every{every}-{repeat}" if every else f"{name}-{repeat}"


def _fit_measured(variant: Variant, config: Config, directory: str):
    """Builds the run and fits it; returns its window, timer, memory
    sampler and the `fit` wall times (start, end)."""
    x, y = synthetic_data(config.steps_per_epoch * config.batch_size)
    model = build_model(config.width)
    callbacks, timer = variant.build(directory, config, x, model)
    window = Window(callbacks, warmup_epochs=WARMUP_EPOCHS)
    if isinstance(callbacks, list):
        callbacks = [window] + callbacks
    else:  # Our list: the window goes first in it.
        callbacks.callbacks.insert(0, window)
        window.set_model(model)
    with PeakMemory() as memory:
        start = time.perf_counter()
        model.fit(x, y, epochs=config.epochs, batch_size=config.batch_size,
                  shuffle=False, verbose=0, callbacks=callbacks)
        end = time.perf_counter()
        window.cpu.end()
    return window, timer, memory, start, end


def run_once(variant: Variant, config: Config, repeat: int,
             scratch: str) -> dict:
    """One training run of `variant`; its figures and its checkpoints.

    A probe of the machine's speed (`measure.cpu_probe`) runs first, so
    that a run made in a slow stretch of a shared machine can be told.
    """
    every = config.save_every if variant.saves else None
    directory = os.path.join(scratch, _slug(variant, every, repeat))
    os.makedirs(directory)
    result = {
        "name": variant.name, "note": variant.note, "repeat": repeat,
        "every": every,
        "status": "ok", "directory": directory, "steps_per_s": None,
        "wall_s": None, "warmup_s": None, "save_times": [],
        "end_wait_s": None,
        "memcpy_s": None,
        "peak_rss_bytes": None, "checkpoints": 0, "verified": None,
        "probe_s": None, "cpu_trainer_s": None, "cpu_workers_s": None,
        "checkpoints_in_window": 0, "checkpoint_bytes": None,
        "worker_process_cpus": [],
        "threads": None,
    }
    missing = variant.missing()
    if missing:
        result["status"] = missing
        return result
    result["probe_s"] = cpu_probe()
    try:
        mode = variant.placement or config.threads
        with placed(mode) as moved:
            window, timer, memory, start, end = _fit_measured(
                variant, config, directory)
        result["threads"] = mode if moved else "free"
    except Exception as exc:  # The row reports it.
        result["status"] = _error(exc)
        return result
    measured = (config.epochs - WARMUP_EPOCHS) * config.steps_per_epoch
    steps = written_checkpoints(directory, config.steps_per_epoch)
    result.update(
        steps_per_s=measured / (end - window.start),
        wall_s=end - start,
        warmup_s=window.warmup_s,
        save_times=timer.clock.save_times if timer else [],
        memcpy_s=(statistics.median(timer.clock.floor.times)
                  if timer and timer.clock.floor
                  and timer.clock.floor.times else None),
        end_wait_s=timer.clock.end_time if timer else None,
        peak_rss_bytes=memory.peak_bytes,
        cpu_trainer_s=window.cpu.trainer_s,
        cpu_workers_s=window.cpu.workers_s,
        checkpoints=len(steps),
        # Saves of the warm-up epoch were done before the window opened.
        checkpoints_in_window=sum(
            step > WARMUP_EPOCHS * config.steps_per_epoch for step in steps),
        checkpoint_bytes=keras_file_bytes(directory),
        # Where the worker processes (if any) may run: proof of pinning.
        worker_process_cpus=descendants_cpus(),
    )
    return result


def verify(result: dict, reference: dict | None, config, scratch: str) -> None:
    """Marks `result` verified if every checkpoint it wrote loads and
    equals, bit for bit, plain Keras' checkpoint of the same step."""
    if result["status"] != "ok" or not result["checkpoints"]:
        return
    mine = written_checkpoints(result["directory"], config.steps_per_epoch)
    if reference is None:
        result["verified"] = None
        return
    theirs = written_checkpoints(reference["directory"], config.steps_per_epoch)
    if sorted(mine) != sorted(theirs):
        result["verified"] = False
        result["status_detail"] = (f"steps {sorted(mine)} written, "
                                   f"plain Keras wrote {sorted(theirs)}")
        return
    try:
        result["verified"] = all(
            same_arrays(checkpoint_arrays(mine[step], config.width, scratch),
                        checkpoint_arrays(theirs[step], config.width, scratch))
            for step in sorted(mine)
        )
    except Exception as exc:  # A file that does not load fails the row.
        result["verified"] = False
        result["status_detail"] = _error(exc)


def run_variants(variants: list[Variant], config: Config, repeats: int,
                 scratch: str) -> list[dict]:
    """Every variant, `repeats` times, interleaved (A B C A B C ...), after
    one warm-up run that is not counted."""
    return run_schedule([(variant, config) for variant in variants],
                        repeats, scratch)


def single_schedule(variants: list[Variant], config: Config,
                    intervals: list[int]) -> list[tuple[Variant, Config]]:
    """One repeat of the single-callback view: the variants that write no
    checkpoint once (their run is every interval's baseline), then every
    save interval with every variant that saves."""
    quiet = [(v, config) for v in variants if not v.saves]
    return quiet + [
        (variant, dataclasses.replace(config, save_every=every))
        for every in intervals for variant in variants if variant.saves]


def _label(variant: Variant, config: Config) -> str:
    every = f", every {config.save_every}" if variant.saves else ""
    return f"{variant.name}{every}"


def run_schedule(schedule: list[tuple[Variant, Config]], repeats: int,
                 scratch: str) -> list[dict]:
    """Every (variant, config) of `schedule`, in its order, `repeats`
    times (the whole schedule per repeat: machine drift hits all alike),
    after one warm-up run that is not counted. Checkpoints are verified
    against plain Keras' of the same save interval."""
    _progress("warm-up run (not counted)")
    warmup = run_once(*schedule[0], -1, scratch)
    shutil.rmtree(warmup["directory"], ignore_errors=True)
    runs: list[dict] = []
    references: dict[int | None, dict] = {}
    total = repeats * len(schedule)
    for repeat in range(repeats):
        for index, (variant, config) in enumerate(schedule):
            number = repeat * len(schedule) + index + 1
            _progress(f"[{number}/{total}] {_label(variant, config)}, "
                      f"repeat {repeat + 1}/{repeats}")
            began = time.perf_counter()
            result = run_once(variant, config, repeat, scratch)
            reference = references.get(result["every"])
            if variant.name == REFERENCE and reference is None and (
                    result["status"] == "ok"):
                references[result["every"]] = result
                result["verified"] = True  # The reference itself.
            else:
                verify(result, reference, config, scratch)
                shutil.rmtree(result["directory"], ignore_errors=True)
            _report_run(result, time.perf_counter() - began)
            runs.append(result)
    for result in runs:
        result.pop("directory", None)
    return runs


def _report_run(result: dict, seconds: float) -> None:
    _progress(f"    {result['status']}"
              + (f", {result['steps_per_s']:.1f} steps/s"
                 if result["steps_per_s"] else "")
              + (f", verified {result['verified']}"
                 if result["verified"] is not None else "")
              + (f", probe {result['probe_s'] * 1e3:.0f} ms"
                 if result["probe_s"] else "")
              + f", {seconds:.1f} s with verification")


# The sweep.

class NeedsModel(keras.callbacks.Callback):
    """Offloaded, needs the full state at every checkpoint step."""

    def __init__(self, every: int):
        super().__init__()
        self.every = every
        self.asynccb_state = lambda hook, args: (
            "full" if hook == "on_train_batch_end"
            and (args[0] + 1) % every == 0 else "none")

    def on_train_batch_end(self, batch, logs=None):
        self.model.weights[0].shape  # Reads its shadow; cheap.


def _capture_seconds(layout, allocate, repeats: int = 5) -> float:
    buffer = allocate(layout.nbytes)
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            layout.capture(buffer)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        buffer.free()


def _trained(width: int, batch: int):
    model = build_model(width)
    x, y = synthetic_data(batch)
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0)  # Builds Adam.
    return model


def sweep_size(mib: float, scratch: str) -> dict:
    """One size of the sweep: snapshot and checkpoint costs for a model
    whose state (weights + Adam) is about `mib` MiB."""
    width = width_for_state(int(mib * 2**20))
    batch = 8
    model = _trained(width, batch)
    nbytes = state_nbytes(model)
    layout = StateLayout(StateLevel.FULL,
                         state_variables(model, StateLevel.FULL))
    row = {
        "state_bytes": nbytes,
        "memcpy_s": memcpy_seconds(nbytes),
        "snapshot_private_s": _capture_seconds(layout, allocate_private),
        "snapshot_shared_s": _capture_seconds(layout, allocate_shared),
    }
    every, saves = 4, 5
    directory = os.path.join(scratch, f"sweep-{mib:g}")
    # `latest`: a save still pending when the next comes is replaced, so
    # the trainer never waits on the worker and what is timed is the
    # snapshot and the queueing alone.
    floor = CopyFloor(nbytes)
    timer = SaveTimer(AsyncCallback(keras.callbacks.ModelCheckpoint(
        os.path.join(directory, "{epoch}-{batch}.keras"),
        save_freq=every), executor="process", on_full="latest"), every,
        floor=floor)
    x, y = synthetic_data(every * saves * batch)
    model.fit(x, y, epochs=1, batch_size=batch, verbose=0, shuffle=False,
              callbacks=[timer])
    shutil.rmtree(directory, ignore_errors=True)
    times = timer.clock.save_times
    row.update(stall_p50_s=percentile(times, 50),
               stall_p99_s=percentile(times, 99),
               memcpy_in_run_s=percentile(floor.times, 50),
               saves=len(times))
    return row


def sweep(args, scratch: str) -> dict:
    """Training-thread cost per checkpoint against state size, and against
    the number of offloaded callbacks needing the model at one step.

    Each size runs in a fresh process: the largest need most of the
    machine's memory (the model, its snapshot buffers, the worker's
    shadow), and nothing of the previous size may linger.
    """
    sizes = []
    for mib in [float(s) for s in args.sweep_sizes.split(",")]:
        _progress(f"sweep: {mib:g} MiB of state "
                  f"(width {width_for_state(int(mib * 2**20))})")
        result = subprocess.run(
            [sys.executable, __file__, "--sweep-size", str(mib),
             "--tf-threads", str(args.tf_threads), "--scratch", scratch],
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            sizes.append({"state_bytes": int(mib * 2**20), "error":
                          result.stderr.strip().splitlines()[-1:]})
            _progress(f"    failed (exit code {result.returncode})")
            continue
        sizes.append(json.loads(result.stdout.strip().splitlines()[-1]))

    counts = []
    width = width_for_state(30 * 2**20)
    model = _trained(width, 16)
    for count in (1, 2, 4, 8):
        _progress(f"sweep: {count} offloaded callbacks at the same step")
        every, batch = 4, 16
        callbacks = TimedList([AsyncCallback(NeedsModel(every))
                               for _ in range(count)], model=model,
                              add_history=True, every=every)
        x, y = synthetic_data(every * 8 * batch)
        model.fit(x, y, epochs=1, batch_size=batch, verbose=0, shuffle=False,
                  callbacks=callbacks)
        stats = callbacks.stats()
        times = callbacks.clock.save_times
        counts.append({
            "callbacks": count,
            "stall_p50_s": percentile(times, 50),
            "stall_p99_s": percentile(times, 99),
            "snapshots_per_step": stats.snapshots / max(len(times), 1),
        })
    return {"sizes": sizes, "callbacks": counts}



if __name__ == "__main__":  # One size of the sweep, in its own process.
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep-size", type=float, required=True)
    parser.add_argument("--tf-threads", type=int, default=1)
    parser.add_argument("--scratch", required=True)
    options = parser.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(options.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print(json.dumps(sweep_size(options.sweep_size, options.scratch)))
