"""Save cost: what one checkpoint costs the machine in CPU, by state size
and file format, against a raw write of the same bytes.

For MLPs whose state (weights + Adam) is 10 MiB to 1.5 GiB, a
ModelCheckpoint saves every 2 steps, as a `.keras` file or, with
`save_weights_only=True`, a `.weights.h5` file; it runs inline in plain
Keras ("keras") and in `asynccb.AsyncCallback` on the thread and on the
process executor, with fast saves on and off ("fast off": every save
through Keras' writer, as before fast saves); and on a thread with fast
saves written through the page cache ("page cache": as on a file system
that refuses the direct I/O they use where they can).

How to read the tables:

- CPU per checkpoint (ms): the CPU seconds of a whole `fit`, the training
  process (all its threads) plus asynccb's worker processes, minus those
  of the no-callback `fit` of the same repeat: training cancels out, and
  what is left is what saving cost, wherever it ran. Each variant also
  runs a `fit` with one save; the long fit's cost less that one's, over
  its other saves, is what each save after a run's first costs (the
  figure of the tables), and the one-save fit's cost is the first save
  with what a run pays once (tracing asynccb's snapshot reader; with fast
  saves, the first save is Keras' own and asynccb learns the file's
  layout from it; the process executor's warm worker keeps what it
  learned for the next run of the same model).
- x raw: that over the same figure of the "raw write" variant, paired in
  the same repeat: a callback that, at each step a checkpoint is due,
  has a writer thread write a checkpoint file's worth of bytes from
  memory to a new file (`os.write` in 8 MiB pieces, `fsync`, the file's
  pages then dropped from the page cache, as asynccb's saves do). It is
  what the bytes of the checkpoints cost, written at the same moments,
  under the same page-cache and disk load as the checkpoints (a single
  write apart, `raw_writes.raw_write_seconds`, from a reused 8 MiB piece
  into a quiet page cache, is in the table, and in the JSON as
  `over_raw_write_apart`). Median over repeats, with min-max: 1x is about
  the least any format can cost.
- "fast save writer apart": asynccb's fast-save writer alone, beside the
  raw write apart and as quiet (no training, no snapshot, no dispatch):
  a template learned from Keras' save of the model's state, written
  atomically from a copy of that state (`fast_writer_seconds`); "x" over
  the raw write apart of the same repeat.
- "raw write, pages kept": the same writes keeping their pages cached, as
  a plain write and Keras' saves do. On a VM whose free memory goes back
  to its host (virtio-balloon free page reporting, as here), each write
  then takes new pages, which cost many times their copy.
- The JSON has each asynccb variant's `stats().save_paths` (last repeat;
  a warning is printed if a variant's paths contradict its name), and the
  wall time of each `fit` over the no-callback one's.

Each size runs in a fresh process (the largest need most of the memory).
There, after two unmeasured `fit`s of every variant (one save, then as
many as a measured fit: the train step is traced, the process executor's
worker starts and imports TensorFlow, fast saves learn the files' layout
and take the snapshot memory a run keeps for the next), the repeats run
every format x variant, in an order rotated per repeat, on one model and
one data set; the warm worker serves them all.

Run from the repository root:

    python benchmarks/save_cost.py           10 and 100 MiB, 3 repeats
    python benchmarks/save_cost.py --full    10 MiB to 1.5 GiB, 5 repeats
    python benchmarks/save_cost.py --tiny    a smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from typing import Any

import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

EVERY, BATCH = 2, 8
# A save's figure is the difference of two fits over the saves between
# them: with 2 GiB of saves per fit (7 at 300 MiB), the raw write
# variant's own figure at 300 MiB moved by 10x between runs.
SAVES_BYTES, MIN_SAVES, MAX_SAVES = 6 * 2**30, 8, 40
DEFAULT_SIZES, FULL_SIZES = "10,100", "10,30,100,300,1000,1500"
DEFAULT_REPEATS, FULL_REPEATS = 3, 5
FORMATS = {".keras": "{batch}.keras", ".weights.h5": "{batch}.weights.h5"}
BASELINE = "none"
ASYNC = {  # Variant name: (executor, fast_saves).
    "asynccb thread": ("thread", True),
    "asynccb process": ("process", True),
    "asynccb thread, page cache": ("thread", True),
    "asynccb thread, fast off": ("thread", False),
    "asynccb process, fast off": ("process", False),
}
# Fast saves written through the page cache (as on a file system that
# refuses direct I/O), beside the thread's direct writes: what direct I/O
# gains. A thread only: a warm worker process keeps its own setting.
PAGE_CACHE = "asynccb thread, page cache"
RAW = "raw write"
RAW_KEPT = "raw write, pages kept"
VARIANTS = [BASELINE, RAW, "keras", *ASYNC, RAW_KEPT]
"""Every variant; the first two are always measured."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default=None,
                        help=f"MiB of state (weights + Adam): {DEFAULT_SIZES}"
                             f", or {FULL_SIZES} with --full")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"{DEFAULT_REPEATS}, or {FULL_REPEATS} with "
                             "--full")
    parser.add_argument("--saves", type=int, default=None,
                        help=f"saves per fit (default: "
                             f"{SAVES_BYTES // 2**30} GiB over the state, "
                             f"within {MIN_SAVES}..{MAX_SAVES})")
    parser.add_argument("--variants", default=";".join(VARIANTS[2:]),
                        help="variants besides the no-callback and raw "
                             "write ones, separated by ';'")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra-op threads for training")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--tiny", action="store_true",
                        help="sizes 1,2 MiB, 1 repeat, 3 saves (tests)")
    parser.add_argument("--output", default=os.path.join(BENCHMARKS,
                                                         "results"))
    parser.add_argument("--one-size", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.sizes, args.repeats, args.saves = "1,2", 1, 3
    args.sizes = args.sizes or (FULL_SIZES if args.full else DEFAULT_SIZES)
    args.repeats = args.repeats or (FULL_REPEATS if args.full
                                    else DEFAULT_REPEATS)
    return args


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _rotated(items: list, by: int) -> list:
    by %= len(items)
    return items[by:] + items[:by]


def callbacks_of(name: str, form: str, directory: str,
                 payload: bytes | None = None) -> list[Any]:
    """The callbacks of variant `name`; the raw write variant writes
    `payload` (a checkpoint's worth of bytes) at each save step."""
    import keras

    from asynccb import AsyncCallback

    if name == BASELINE:
        return []
    if name in (RAW, RAW_KEPT):
        assert payload is not None, "known from the keras warm-up fit"
        return [_raw_writes_class()(directory, payload,
                                    keep_cached=name == RAW_KEPT)]
    checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(directory, FORMATS[form]), save_freq=EVERY,
        save_weights_only=form == ".weights.h5")
    if name not in ASYNC:
        return [checkpoint]
    executor, fast = ASYNC[name]
    return [AsyncCallback(checkpoint, executor=executor, fast_saves=fast)]


def _raw_writes_class() -> type:
    import keras

    from raw_writes import write_and_sync

    class RawWrites(keras.callbacks.Callback):
        """At each step a checkpoint is due, has a writer thread write a
        checkpoint's worth of bytes (random, from memory, as a save reads
        its state) to a new file: `os.write` in 8 MiB pieces, `fsync`,
        then the file's pages dropped from the page cache unless
        `keep_cached` (see `raw_writes.write_pieces`). Off the training
        thread, as an offloaded save is: a training thread blocked on the
        disk costs CPU of its own (TF's idle threads), which is not the
        bytes' cost."""

        def __init__(self, directory: str, payload: bytes,
                     keep_cached: bool = False):
            super().__init__()
            self.directory, self.payload = directory, memoryview(payload)
            self.keep_cached = keep_cached
            self.paths: queue.SimpleQueue = queue.SimpleQueue()
            self.writer: threading.Thread | None = None

        def on_train_begin(self, logs: Any = None) -> None:
            self.writer = threading.Thread(target=self._write, daemon=True)
            self.writer.start()

        def _write(self) -> None:
            while (path := self.paths.get()) is not None:
                write_and_sync(path, self.payload, self.keep_cached)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if (batch + 1) % EVERY == 0:
                self.paths.put(os.path.join(self.directory, f"{batch}.bin"))

        def on_train_end(self, logs: Any = None) -> None:
            self.paths.put(None)  # The sentinel: the writer ends.
            assert self.writer is not None
            self.writer.join()

    return RawWrites


def fit_once(model: Any, data: tuple, name: str, form: str,
             scratch: str, payload: bytes | None = None) -> dict[str, Any]:
    """One measured `fit` of `name`; its written files are then deleted."""
    from measure import CpuWindow

    from asynccb import _file_template

    directory = tempfile.mkdtemp(dir=scratch)
    callbacks = callbacks_of(name, form, directory, payload)
    window = CpuWindow()
    _file_template._DIRECT_IO = name != PAGE_CACHE
    window.begin()
    start = time.perf_counter()
    try:
        model.fit(*data, epochs=1, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=callbacks)
    finally:
        _file_template._DIRECT_IO = True
    wall = time.perf_counter() - start
    window.end()
    files = sorted(os.listdir(directory))
    run = {
        "cpu_s": window.trainer_s + window.workers_s,
        "cpu_trainer_s": window.trainer_s, "cpu_workers_s": window.workers_s,
        "wall_s": wall, "files": len(files),
        "file_bytes": (os.path.getsize(os.path.join(directory, files[0]))
                       if files else None),
        "save_paths": (dict(callbacks[0].stats().save_paths)
                       if name in ASYNC else None),
    }
    shutil.rmtree(directory)
    return run


def fast_writer_seconds(model: Any, form: str, scratch: str,
                        repeats: int = 5) -> dict[str, float]:
    """What asynccb's fast-save writer costs alone, beside one raw write
    apart: a template learned from Keras' save of the model's state, then
    written from a private copy of that state as a fast save writes it
    (temporary name, direct I/O where taken, `fsync`, rename) `repeats`
    times; the medians of CPU seconds (this process) and wall seconds. No
    training, no snapshot, no dispatch: what is left of a fast save's cost
    in a run is theirs."""
    from asynccb._file_template import learn_keras_file, learn_weights_file
    from asynccb._save_sources import dataset_slots
    from asynccb._saving import atomic_path
    from asynccb._snapshot import (
        StateLayout,
        StateLevel,
        allocate_private,
        state_variables,
    )
    from raw_writes import median_cost

    variables = state_variables(model, StateLevel.FULL)
    layout = StateLayout(StateLevel.FULL, variables)
    buffer = allocate_private(layout.nbytes)
    layout.capture(buffer)
    arrays = buffer.views(layout.spec)
    slots = dataset_slots(model, variables)
    path = os.path.join(scratch, "fast-writer" + form)
    if form == ".keras":
        model.save(path)
        template = learn_keras_file(path, slots, arrays, ())
    else:
        model.save_weights(path)
        template = learn_weights_file(path, slots, arrays)

    def write() -> None:
        with atomic_path(path) as tmp:
            template.write(tmp, arrays)

    try:
        cost = median_cost(write, repeats)
    finally:
        # Given back to the memory kept for the next run, which it may
        # have come from: kept by this function, it would cost the
        # thread variant's next fit new pages (seconds at 1 GiB and up).
        buffer.free()
    os.remove(path)
    return {"bytes": template.size, **cost}


def summarize(runs: dict[str, list[dict]], firsts: dict[str, list[dict]],
              raws: list[dict], saves: int) -> list[dict[str, Any]]:
    """Per variant: medians over repeats of figures paired with the same
    repeat's no-callback fits and raw write.

    `firsts` are fits with one save: their cost, less the no-callback one
    of the same length, is the first save of a run with what a run pays
    once; the long fit's cost less that, over its other saves, is what
    each save after the first costs."""
    def first(name: str) -> list[float]:
        return [f["cpu_s"] - b["cpu_s"]
                for f, b in zip(firsts[name], firsts[BASELINE])]

    def per_save(name: str) -> list[float]:
        return [(r["cpu_s"] - b["cpu_s"] - f) / (saves - 1)
                for r, b, f in zip(runs[name], runs[BASELINE], first(name))]

    raw = per_save(RAW)
    rows = []
    for name, own in runs.items():
        costs = per_save(name)
        # A repeat whose raw write variant measured as nothing (noise at
        # the smallest sizes) has no ratio.
        ratios = [c / r for c, r in zip(costs, raw) if r > 0] or [math.nan]
        apart = [c / w["cpu_s"] for c, w in zip(costs, raws)
                 if w["cpu_s"] > 0] or [math.nan]
        rows.append({
            "name": name,
            "cpu_per_checkpoint_s": statistics.median(costs),
            "over_raw_write": statistics.median(ratios),
            "over_raw_write_min": min(ratios),
            "over_raw_write_max": max(ratios),
            "over_raw_write_apart": statistics.median(apart),
            "first_save_s": statistics.median(first(name)),
            "wall_vs_none": statistics.median(
                r["wall_s"] / b["wall_s"]
                for r, b in zip(own, runs[BASELINE])),
            "save_paths": own[-1]["save_paths"],
            "runs": own, "first_runs": firsts[name],
        })
    return rows


def measure_size(mib: float, repeats: int, saves: int | None,
                 scratch: str, variants: list[str]) -> dict[str, Any]:
    """Every format x variant, `repeats` times, for one size of state."""
    import asynccb
    from measure import state_nbytes
    from raw_writes import raw_write_seconds
    from runner import width_for_state
    from variants import build_model, synthetic_data

    width = width_for_state(int(mib * 2**20))
    model = build_model(width)
    x, y = synthetic_data(BATCH)
    model.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)  # Builds Adam.
    nbytes = state_nbytes(model)
    saves = saves or min(MAX_SAVES, max(MIN_SAVES,
                                        round(SAVES_BYTES / nbytes)))
    x, y = synthetic_data(EVERY * saves * BATCH)
    _progress(f"{mib:g} MiB (width {width}, {saves} saves): warm-up fits")
    # What each format's checkpoint file holds (the keras warm-up fit's
    # file): the raw write variant writes that many bytes.
    payloads: dict[str, bytes] = {}
    short = (x[:EVERY * BATCH], y[:EVERY * BATCH])  # One save.
    for form in FORMATS:
        for name in ["keras"] + [n for n in variants if n != "keras"]:
            run = fit_once(model, short, name, form, scratch,
                           payloads.get(form))
            if name == "keras":
                payloads[form] = np.random.default_rng(0).bytes(
                    run["file_bytes"])
            # A long fit too: the fast saves' second snapshot buffer is
            # taken there (paged in once, then kept); with one warm-up
            # save, the first repeat paid it (seconds at 1 GiB and up,
            # which made that repeat's per-save figure negative). Not for
            # "keras" when only its file's size is wanted: at 1.5 GiB its
            # saves take seconds each.
            if name in variants:
                fit_once(model, (x, y), name, form, scratch, payloads[form])
    runs = {form: {name: [] for name in variants} for form in FORMATS}
    firsts = {form: {name: [] for name in variants} for form in FORMATS}
    raws: dict[str, list[dict]] = {form: [] for form in FORMATS}
    writers: dict[str, list[dict]] = {form: [] for form in FORMATS}
    for repeat in range(repeats):
        for form in _rotated(list(FORMATS), repeat):
            _progress(f"{mib:g} MiB, {form}, repeat {repeat + 1}/{repeats}")
            for name in _rotated(variants, repeat):
                firsts[form][name].append(fit_once(
                    model, short, name, form, scratch, payloads[form]))
                runs[form][name].append(fit_once(
                    model, (x, y), name, form, scratch, payloads[form]))
            # The keras warm-up's file size (the "keras" variant may not
            # be among those measured).
            raws[form].append(raw_write_seconds(len(payloads[form]),
                                                scratch))
            writers[form].append(fast_writer_seconds(model, form, scratch))
    asynccb.shutdown()
    return {
        "mib": mib, "width": width, "state_bytes": nbytes, "every": EVERY,
        "saves": saves, "steps": EVERY * saves, "batch_size": BATCH,
        "formats": {form: {"raw_write": raws[form],
                           "fast_writer": writers[form],
                           "variants": summarize(runs[form], firsts[form],
                                                 raws[form], saves)}
                    for form in FORMATS},
    }


def run_sizes(args: argparse.Namespace, scratch: str) -> list[dict]:
    rows = []
    for mib in [float(s) for s in args.sizes.split(",")]:
        command = [sys.executable, os.path.abspath(__file__),
                   "--one-size", str(mib), "--repeats", str(args.repeats),
                   "--tf-threads", str(args.tf_threads), "--scratch", scratch,
                   "--variants", args.variants]
        if args.saves:
            command += ["--saves", str(args.saves)]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            _progress(f"{mib:g} MiB failed (exit code {done.returncode})")
            rows.append({"mib": mib, "error": f"exit code {done.returncode}"})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def machine() -> dict[str, Any]:
    """As the other benchmarks record it (versions without importing)."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(),
            **{name: metadata.version(name) for name in ("tensorflow",
                                                          "keras")}}


def _cell(variant: dict) -> str:
    return (f"{variant['cpu_per_checkpoint_s'] * 1e3:.1f} "
            f"({variant['over_raw_write']:.1f}x, "
            f"{variant['over_raw_write_min']:.1f}-"
            f"{variant['over_raw_write_max']:.1f})")


def markdown_table(rows: list[dict], form: str, variants: list[str]) -> str:
    names = variants[1:]
    lines = ["| state MiB | saves | one raw write apart ms | "
             "fast save writer apart ms (x) | "
             + " | ".join(names)
             + " | first save ms: " + ", ".join(names) + " |",
             "|---" * (5 + len(names)) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['mib']:g} | {row['error']} |")
            continue
        part = row["formats"][form]
        raw = statistics.median(r["cpu_s"] for r in part["raw_write"])
        writer = statistics.median(w["cpu_s"] for w in part["fast_writer"])
        writer_x = statistics.median(
            [w["cpu_s"] / r["cpu_s"] for w, r in
             zip(part["fast_writer"], part["raw_write"]) if r["cpu_s"]]
            or [math.nan])
        by_name = {v["name"]: v for v in part["variants"]}
        cells = [f"{row['state_bytes'] / 2**20:.3g}", str(row["saves"]),
                 f"{raw * 1e3:.1f}",
                 f"{writer * 1e3:.1f} ({writer_x:.2f}x)"] + [
                     _cell(by_name[n]) for n in names] + [
            ", ".join(f"{by_name[n]['first_save_s'] * 1e3:.0f}"
                      for n in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def path_warnings(rows: list[dict]) -> list[str]:
    """Variants whose saves did not take the path their name says."""
    found = []
    for row in rows:
        for form, part in row.get("formats", {}).items():
            for variant in part["variants"]:
                name, paths = variant["name"], variant["save_paths"] or {}
                if name in ASYNC and ASYNC[name][1] != ("fast" in paths):
                    found.append(f"warning: {row['mib']:g} MiB, {form}, "
                                 f"{name}: save paths {paths}")
    return found


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    chosen = args.variants.split(";")
    unknown = set(chosen) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: "
                         f"{', '.join(VARIANTS[2:])}")
    variants = VARIANTS[:2] + [n for n in VARIANTS[2:] if n in chosen]
    if args.one_size is not None:  # A size's own process.
        from heavy_checkpointing import configure_tensorflow

        threads = configure_tensorflow(args.tf_threads)
        row = measure_size(args.one_size, args.repeats, args.saves,
                           args.scratch, variants)
        print(json.dumps({**row, **threads}, default=float))
        return None
    from report import write_json

    scratch = tempfile.mkdtemp(prefix="asynccb-save-cost-")
    started = time.perf_counter()
    try:
        rows = run_sizes(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = {"args": vars(args), "machine": machine(),
                "seconds": time.perf_counter() - started, "sizes": rows}
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, f"save_cost-tf{args.tf_threads}-"
                        f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, document)
    for form in FORMATS:
        print(f"\n{form}: CPU per checkpoint after a run's first (all "
              f"processes, less the no-callback fit and the one-save fit), "
              f"ms (x the raw write variant's: the file's bytes written "
              f"inline at the same steps; min-max), and the first save of a "
              f"run; saves every {EVERY} steps, batch "
              f"{BATCH}; TF "
              f"threads {args.tf_threads} intra-op / 1 inter-op; "
              f"{args.repeats} interleaved repeats, medians.\n")
        print(markdown_table(rows, form, variants))
    for warning in path_warnings(rows):
        print(warning)
    print(f"\nJSON: {path}; {document['seconds']:.0f} s in all.")
    return document


if __name__ == "__main__":
    main()
