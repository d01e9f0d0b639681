"""Memory per fit: does a loop of `fit`s of new models (a notebook, a
hyper-parameter search) grow the training process, and asynccb's worker,
more than plain Keras grows it?

Each variant runs in a fresh process of its own, `--fits` times: a new
784-W-W-10 MLP (Adam) fitted for 2 epochs with a ModelCheckpoint every 5
steps, inline (plain Keras) or wrapped on asynccb's thread or process
executor. After each fit the model and the callbacks are dropped and
garbage collected, and the resident memory of the training process and of
asynccb's worker processes is read. Reported per variant, median over
repeats: the growth per fit (the least-squares slope over the fits after
the first, which pays TensorFlow's warm-up), and how many of the fits'
models were still alive at the end (0 unless something keeps them).

Run from the repository root: python benchmarks/memory_per_fit.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("keras", "asynccb thread", "asynccb process")
MIB = 2**20


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fits", type=int, default=10)
    parser.add_argument("--width", type=int, default=1200,
                        help="hidden width (1200: 27 MiB of state)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results",
                        help="directory of the JSON file")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(variant: str, fits: int, width: int) -> dict:
    """The fits of one variant, in this (fresh) process."""
    import gc
    import weakref

    import keras

    from asynccb import AsyncCallback
    from measure import descendants_cpu_and_rss, rss_bytes
    from variants import build_model, synthetic_data

    x, y = synthetic_data(64 * 20)
    directory = tempfile.mkdtemp(prefix="asynccb-memory-")
    models, trainer, workers = [], [], []
    for fit in range(fits):
        model = build_model(width)
        checkpoint = keras.callbacks.ModelCheckpoint(
            os.path.join(directory, f"{fit}-{{epoch}}-{{batch}}.keras"),
            save_freq=5)
        if variant != "keras":
            checkpoint = AsyncCallback(checkpoint,
                                       executor=variant.split()[1])
        model.fit(x, y, batch_size=64, epochs=2, verbose=0,
                  callbacks=[checkpoint])
        models.append(weakref.ref(model))
        del model, checkpoint
        for name in os.listdir(directory):
            os.remove(os.path.join(directory, name))
        gc.collect()
        trainer.append(rss_bytes(os.getpid()))
        workers.append(descendants_cpu_and_rss()[1])
    os.rmdir(directory)
    return {"trainer_rss": trainer, "workers_rss": workers,
            "models_alive": sum(ref() is not None for ref in models)}


def slope(values: list[int]) -> float | None:
    """Bytes per fit: the least-squares slope over the fits after the
    first."""
    points = values[1:]
    if len(points) < 2:
        return None
    return statistics.linear_regression(range(len(points)), points).slope


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.fits, args.width)))
        return {}
    runs = []
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            done = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child",
                 variant, "--fits", str(args.fits), "--width",
                 str(args.width)],
                capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run.update(variant=variant, repeat=repeat)
            runs.append(run)
            print(f"[{repeat + 1}/{args.repeats}] {variant}: trainer "
                  f"{run['trainer_rss'][0] / MIB:.0f} -> "
                  f"{run['trainer_rss'][-1] / MIB:.0f} MiB", flush=True)
    rows = []
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        rows.append({
            "variant": variant,
            "trainer_bytes_per_fit": _median(
                [slope(r["trainer_rss"]) for r in mine]),
            "workers_bytes_per_fit": _median(
                [slope(r["workers_rss"]) for r in mine]),
            "models_alive": max(r["models_alive"] for r in mine),
        })
    print(f"\n{args.fits} fits of a new {args.width}-wide MLP each, "
          f"{args.repeats} repeats, each variant in a fresh process; "
          "growth per fit after the first (median of least-squares "
          "slopes).\n")
    print("| variant | training process MiB/fit | worker processes MiB/fit |"
          " models alive at the end |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {_mib(row['trainer_bytes_per_fit'])} | "
              f"{_mib(row['workers_bytes_per_fit'])} | "
              f"{row['models_alive']} of {args.fits} |")
    document = {"config": {"fits": args.fits, "width": args.width,
                           "repeats": args.repeats},
                "variants": rows, "runs": runs}
    os.makedirs(args.output, exist_ok=True)
    path = os.path.join(args.output, "memory_per_fit.json")
    with open(path, "w") as file:
        json.dump(document, file, indent=1)
    print(f"\nJSON: {path}")
    return document


if __name__ == "__main__":
    main()
