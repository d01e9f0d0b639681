"""Where the OS puts training's two threads, and what it does to steps/s.

With one TensorFlow thread, a Keras `fit` runs on two busy threads: the
Python thread that drives each step and TensorFlow's compute thread. On a
2-core machine the OS puts them on one core or on two, and keeps them
there for a while. This benchmark fits the heavy benchmark's MLP with no
callbacks, each repeat three ways, interleaved: "free" (as the OS places
the threads), "together" (both threads kept to CPU 0) and "apart" (the
Python thread on CPU 0, TensorFlow's threads on CPU 1). It reports steps/s
and the process' CPU seconds per wall second, medians with min-max.

On this machine "together" runs at the heavy benchmark's slow no-callback
speed, "apart" at its fast one, and "free" lands on either: the heavy
benchmark's no-callback runs are bimodal for this reason, run by run (see
the README, "How to read these numbers").

Linux only (per-thread CPU affinity). Run from the repository root:

    python benchmarks/thread_placement.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from placement import MODES, placed  # noqa: E402


def fit_once(model, data, batch_size: int) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    model.fit(*data, epochs=1, batch_size=batch_size, verbose=0,
              shuffle=False)
    wall = time.perf_counter() - start
    return {"steps_per_s": len(data[0]) // batch_size / wall,
            "cpu_per_wall": (time.process_time() - cpu) / wall}


def summary(runs: list[dict[str, float]]) -> dict[str, float]:
    speeds = [r["steps_per_s"] for r in runs]
    return {"steps_per_s": statistics.median(speeds),
            "min": min(speeds), "max": max(speeds),
            "cpu_per_wall": statistics.median(r["cpu_per_wall"]
                                              for r in runs)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra-op threads")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated placements to run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        parser.error("needs at least two CPUs")

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from report import write_json
    from variants import build_model, synthetic_data

    model = build_model(args.width)
    x, y = synthetic_data(args.steps * args.batch_size)
    fit_once(model, (x[:args.batch_size * 4], y[:args.batch_size * 4]),
             args.batch_size)  # Traces the step, starts TF's threads.
    modes = args.modes.split(",")
    runs: dict[str, list] = {mode: [] for mode in modes}
    for repeat in range(args.repeats):
        turn = repeat % len(modes)
        for mode in modes[turn:] + modes[:turn]:
            with placed(mode):
                runs[mode].append(fit_once(model, (x, y), args.batch_size))
    result = {"args": vars(args), "cpus": sorted(cpus), "runs": runs,
              "modes": {mode: summary(runs[mode]) for mode in modes}}
    print(f"no-callback fit, {args.steps} steps of {args.batch_size}, "
          f"width {args.width}, TF threads {args.tf_threads} intra-op / "
          f"1 inter-op; "
          f"{args.repeats} interleaved repeats, medians (min-max):")
    for mode, row in result["modes"].items():
        print(f"  {mode:8s} {row['steps_per_s']:5.1f} steps/s "
              f"({row['min']:.1f}-{row['max']:.1f}), CPU/wall "
              f"{row['cpu_per_wall']:.2f}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
