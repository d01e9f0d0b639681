"""What asynccb costs the chief of a two-worker cluster, against one worker.

The chief of a `MultiWorkerMirroredStrategy` cluster does the offloaded
work of the whole cluster (checkpoints, CSV); it should cost its training
thread what asynccb costs a single worker doing the same. Each repeat runs
`examples/multi_worker.py` with one worker and with two (on loopback, in
alternating order), and takes asynccb's share of the chief's checkpoint
step on its training thread (the median over the run's epochs, less the
inline EarlyStopping's). Reported: each run's figure, and the median over
repeats of the two-worker/one-worker ratio, with min and max (a repeat
whose one-worker figure is not above zero, within the noise of the
subtraction, has no ratio and is counted apart).

On a 2-core machine the two workers also compete for the cores (each
trains with one TensorFlow thread), so the two-worker figure holds that
contention too.

Run from the repository root: python benchmarks/chief_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples"))

import multi_worker  # noqa: E402
from report import write_json  # noqa: E402


def _chief_ms(workers: int, epochs: int) -> float:
    with tempfile.TemporaryDirectory(prefix="asynccb-chief-cost-") as root:
        reports = multi_worker.main([
            "--workers", str(workers), "--epochs", str(epochs),
            "--patience", str(epochs + 1), "--directory", root])
    return reports[0]["asynccb_ms_per_checkpoint"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=12,
                        help="checkpoint steps per run (one per epoch)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    runs = []
    for repeat in range(args.repeats):
        order = (1, 2) if repeat % 2 == 0 else (2, 1)
        ms = {workers: _chief_ms(workers, args.epochs) for workers in order}
        ratio = ms[2] / ms[1] if ms[1] > 0 else None
        runs.append({"one_worker_ms": ms[1], "two_workers_chief_ms": ms[2],
                     "ratio": ratio})
        print(f"repeat {repeat}: chief {ms[2]:.3f} ms with two workers, "
              f"{ms[1]:.3f} ms alone: ratio "
              f"{'-' if ratio is None else f'{ratio:.2f}'}", flush=True)
    ratios = [run["ratio"] for run in runs if run["ratio"] is not None]
    if not ratios:
        raise SystemExit("no repeat had a one-worker figure above zero")
    result = {
        "runs": runs,
        "repeats_without_ratio": len(runs) - len(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "one_worker_ms_median": statistics.median(
            run["one_worker_ms"] for run in runs),
        "two_workers_chief_ms_median": statistics.median(
            run["two_workers_chief_ms"] for run in runs),
    }
    print(f"chief of two workers / one worker: asynccb's share of the "
          f"checkpoint step on the training thread, median ratio "
          f"{result['ratio_median']:.2f} (min {result['ratio_min']:.2f}, "
          f"max {result['ratio_max']:.2f}; {len(ratios)} paired repeats of "
          f"{args.epochs} checkpoint steps); medians "
          f"{result['two_workers_chief_ms_median']:.3f} ms against "
          f"{result['one_worker_ms_median']:.3f} ms")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
