"""Heavy checkpointing: how much throughput does each way of running the
callbacks keep?

Trains an MLP on synthetic MNIST-shaped data with heavy callbacks: a
full-model `.keras` checkpoint every N steps (weights and Adam state), a
CSV log, a prediction sanity check every epoch and, if tensorboard is
installed, TensorBoard scalars. Runs them with no callbacks (the limit), in
plain Keras, with asynccb on each executor, and with the alternatives a
user would reach for: TensorFlow's own checkpointing (sync and async) and
Keras' OrbaxCheckpoint. Variants are interleaved and repeated so that
machine drift hits them alike; every checkpoint written is read back and
compared bit for bit with plain Keras' file of the same step.

Run from the repository root: python benchmarks/heavy_checkpointing.py
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", default="10mb",
                        choices=["10mb", "100mb", "1gb", "3gb"],
                        help="model size: weights of about 10 MB, 100 MB; "
                             "1 GB of weights plus Adam state; 1 GB of "
                             "weights (3 GB with Adam)")
    parser.add_argument("--width", type=int, default=None,
                        help="hidden width, instead of a preset")
    parser.add_argument("--steps-per-epoch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run; the first is warm-up (tracing, "
                             "worker start-up) and is not measured")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=20,
                        help="steps between checkpoints")
    parser.add_argument("--sanity-samples", type=int, default=2048,
                        help="samples the sanity check predicts each epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra-op threads for training (1: "
                             "as on a GPU host, a core stays free)")
    parser.add_argument("--variants", default="all",
                        help="comma-separated names, or 'all'")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--output", default=os.path.join(BENCHMARKS,
                                                         "results"),
                        help="directory for the JSON and the plots")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure cost per checkpoint against "
                             "state size and against callback count")
    parser.add_argument("--sweep-sizes", default="10,30,100,300,1000,1500",
                        help="state sizes (MiB, weights + Adam) to sweep; "
                             "about 12x the largest must fit in memory")
    parser.add_argument("--tiny", action="store_true",
                        help="a very small configuration (tests)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        args.width, args.steps_per_epoch, args.epochs = 32, 4, 2
        args.save_every, args.repeats, args.batch_size = 2, 1, 16
        args.sanity_samples = 16
        args.sweep_sizes = "1,2"
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.tf_threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()

    import runner
    from report import (
        markdown_table,
        plot_sweep,
        plot_throughput,
        summarize,
        sweep_tables,
        write_json,
    )
    from variants import PRESETS, VARIANTS, Config

    config = Config(
        width=args.width or PRESETS[args.preset],
        steps_per_epoch=args.steps_per_epoch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        save_every=args.save_every,
        sanity_samples=args.sanity_samples,
        tensorboard=(not args.no_tensorboard
                     and runner.has_module("tensorboard")),
    )
    config.state_bytes = runner.state_bytes_of(config.width)
    chosen = VARIANTS if args.variants == "all" else [
        v for v in VARIANTS
        if v.name in {name.strip() for name in args.variants.split(",")}]
    os.makedirs(args.output, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="asynccb-bench-")
    started = time.perf_counter()
    try:
        runs = runner.run_variants(chosen, config, args.repeats, scratch)
        variants = summarize(runs, baseline="no callbacks")
        sweep = runner.sweep(args, scratch) if args.sweep else {}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    state = runner.state_bytes_of(config.width)
    title = (f"{config.width}-wide MLP, {state / 2**20:.0f} MiB state, "
             f"checkpoint every {config.save_every} steps, "
             f"TF threads {args.tf_threads}")
    document = {
        "config": {**vars(config), "tf_threads": args.tf_threads,
                   "repeats": args.repeats, "state_bytes": state,
                   "preset": args.preset},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "tensorflow": tf.__version__,
                    "keras": __import__("keras").__version__},
        "seconds": time.perf_counter() - started,
        "variants": variants,
        "runs": runs,
        "sweep": sweep,
    }
    size = args.preset if not args.width else args.width
    stem = f"heavy_checkpointing-{size}-tf{args.tf_threads}"
    json_path = os.path.join(args.output, stem + ".json")
    write_json(json_path, document)
    plots = []
    if plot_throughput(variants, os.path.join(args.output, stem + ".png"),
                       title):
        plots.append(stem + ".png")
    if sweep and plot_sweep(sweep, os.path.join(args.output,
                                                 stem + "-sweep.png")):
        plots.append(stem + "-sweep.png")

    print(f"\n{title}; {args.repeats} interleaved repeats, medians.\n")
    print(markdown_table(variants))
    if sweep:
        print()
        print(sweep_tables(sweep))
    print(f"\nJSON: {json_path}"
          + (f"; plots: {', '.join(plots)}" if plots else
             " (pip install -e '.[bench]' for plots)")
          + f"; {document['seconds']:.0f} s in all.")
    return document


if __name__ == "__main__":
    main()
