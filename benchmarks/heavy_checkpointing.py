"""Heavy checkpointing: how much throughput does each way of running the
callbacks keep, and what does a checkpoint cost the machine?

Trains an MLP on synthetic MNIST-shaped data with heavy callbacks: a
full-model `.keras` checkpoint every N steps (weights and Adam state), a
CSV log, a prediction sanity check every epoch and, if tensorboard is
installed, TensorBoard scalars. Runs them with no callbacks (the limit), in
plain Keras, with asynccb on each executor, and with the alternatives a
user would reach for: TensorFlow's own checkpointing (sync and async) and
Keras' OrbaxCheckpoint. Every checkpoint written is read back and compared
bit for bit with plain Keras' file of the same step.

Built to tell the truth on a shared machine:

- Each repeat runs every variant back to back; a variant's headline figure
  is its paired ratio, its steps/s over the no-callback run's of the same
  repeat (median, min-max over repeats).
- The no-callback run keeps its two busy threads (the Python thread
  driving the steps, TensorFlow's) on two CPUs, unless the process is
  pinned whole to one. Where the OS places them, they run at one of two
  speeds, drawn anew each run (`thread_placement.py`); apart they run at
  the faster one every time. `--variants` may add "no callbacks
  (OS-placed)" to see the draw.
- A fixed single-threaded CPU probe (~70 ms) runs before every run. A run
  is slow if its probe, or its repeat's no-callback run, is over 1.3x
  slower than the benchmark's median; paired figures leave out repeats
  with a slow run of the pair (all repeats if fewer than 3 would remain;
  the "n" column says how many were used) and a warning names them.
- CPU seconds of the training process and of asynccb's worker processes
  over the measured window; per checkpoint, the run's CPU minus its
  repeat's no-callback run's, over the checkpoints written in the window,
  and that against a raw write of a checkpoint's bytes (os.write, fsync).
  In the heavy view this includes the CSV log, sanity check, TensorBoard
  and the memcpy floor's copy; the single view has the checkpoint alone.

Commands and their tables (run from the repository root):

    python benchmarks/heavy_checkpointing.py
        The heavy-checkpointing table, every variant, 3 repeats, 64 steps
        per epoch (about 3.5 minutes on 2 cores; 5 repeats would take
        about 6, hence --full).
    python benchmarks/heavy_checkpointing.py --full
        5 repeats, 80 steps per epoch, and the README's sweep tables
        (cost per checkpoint against state size and against the number
        of callbacks) (about 8 minutes).
    python benchmarks/heavy_checkpointing.py --threads-apart \
            --repeats 10 --steps-per-epoch 80 --variants "..."
        The README's first table: every run keeps training's two threads
        apart (the figures that reproduce within 0.05); the README gives
        the variants.
    python benchmarks/heavy_checkpointing.py --pin [--full]
        The free-core condition: training pinned to the first allowed CPU,
        asynccb's workers (processes and threads) to the others.
    python benchmarks/heavy_checkpointing.py --single [--full] [--pin]
        The single-callback view: ModelCheckpoint alone, saving every 5,
        20 and 100 steps (--single-every), inline and on each asynccb
        executor; rows are save interval x variant (about 6 minutes).
    python benchmarks/heavy_checkpointing.py --tiny
        A very small run of everything, for the tests.
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

BASELINE = "no callbacks"
DEFAULT_REPEATS, FULL_REPEATS = 3, 5
DEFAULT_STEPS, FULL_STEPS = 64, 80


def parse_args(argv=None) -> argparse.Namespace:
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
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help=f"{DEFAULT_STEPS}, or {FULL_STEPS} with --full")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs per run; the first is warm-up (tracing, "
                             "worker start-up) and is not measured")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=20,
                        help="steps between checkpoints")
    parser.add_argument("--sanity-samples", type=int, default=2048,
                        help="samples the sanity check predicts each epoch")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"{DEFAULT_REPEATS}, or {FULL_REPEATS} with "
                             "--full")
    parser.add_argument("--full", action="store_true",
                        help=f"the README's figures: {FULL_REPEATS} repeats, "
                             f"{FULL_STEPS} steps per epoch, and --sweep "
                             "(in the heavy view)")
    parser.add_argument("--tf-threads", type=int, default=1,
                        help="TensorFlow intra-op threads for training (1: "
                             "as on a GPU host, a core stays free)")
    parser.add_argument("--pin", action="store_true",
                        help="pin training to the first allowed CPU and "
                             "asynccb's workers to the others")
    parser.add_argument("--threads-apart", action="store_true",
                        help="keep training's two threads apart in every "
                             "run (the driving Python thread on the first "
                             "allowed CPU, TensorFlow's on the second; "
                             "asynccb's workers free on all): the placement "
                             "the OS draws per run, fixed")
    parser.add_argument("--variants", default="all",
                        help="comma-separated names, or 'all'")
    parser.add_argument("--single", action="store_true",
                        help="the single-callback view: ModelCheckpoint "
                             "alone, inline and on each asynccb executor")
    parser.add_argument("--single-every", default="5,20,100",
                        help="save intervals (steps) of the single view")
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
    return apply_modes(parser.parse_args(argv))


def apply_modes(args: argparse.Namespace) -> argparse.Namespace:
    """Resolves --full and --tiny into the settings they stand for."""
    if args.repeats is None:
        args.repeats = FULL_REPEATS if args.full else DEFAULT_REPEATS
    if args.steps_per_epoch is None:
        args.steps_per_epoch = FULL_STEPS if args.full else DEFAULT_STEPS
    if args.full and not args.single:
        args.sweep = True
    if args.tiny:
        args.width, args.steps_per_epoch, args.epochs = 32, 4, 2
        args.save_every, args.repeats, args.batch_size = 2, 1, 16
        args.sanity_samples = 16
        args.sweep_sizes = "1,2"
        args.single_every = "2,4"
    return args


def pin_cpus() -> dict:
    """Pins this process' training to its first allowed CPU and asynccb's
    workers to the others; exits if fewer than two CPUs are allowed.

    Call it before TensorFlow is imported: a thread inherits the CPUs of
    the thread that starts it, so TensorFlow's threads (and the input
    pipeline's) then stay on the training CPU. Plain Keras and the
    no-callback runs are pinned alike: the whole process is.
    """
    if not hasattr(os, "sched_setaffinity"):
        sys.exit("--pin needs os.sched_setaffinity (Linux).")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        sys.exit(f"--pin needs at least 2 CPUs; this process may use only "
                 f"{allowed}.")
    trainer, workers = allowed[:1], allowed[1:]
    import asynccb  # Lazy: does not load TensorFlow.

    asynccb.configure_workers(cpus=set(workers))
    os.sched_setaffinity(0, set(trainer))
    return {"pinned": True, "trainer_cpus": trainer, "worker_cpus": workers}


def configure_tensorflow(threads: int) -> dict:
    """TensorFlow's threads for training; returns what it then reports."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    return {"tf_intra_threads":
            tf.config.threading.get_intra_op_parallelism_threads(),
            "tf_inter_threads":
            tf.config.threading.get_inter_op_parallelism_threads()}


def make_config(args: argparse.Namespace):
    import runner
    from variants import PRESETS, Config

    config = Config(
        width=args.width or PRESETS[args.preset],
        steps_per_epoch=args.steps_per_epoch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        save_every=args.save_every,
        sanity_samples=args.sanity_samples,
        tensorboard=(not args.single and not args.no_tensorboard
                     and runner.has_module("tensorboard")),
        threads="apart" if args.threads_apart else "free",
    )
    config.state_bytes = runner.state_bytes_of(config.width)
    return config


def choose(variants: list, names: str) -> list:
    """The variants named in `names` ('all': every one not left out of
    it), in their order."""
    if names == "all":
        return [v for v in variants if v.in_all]
    wanted = {name.strip() for name in names.split(",")}
    return [v for v in variants if v.name in wanted]


def schedule_of(args: argparse.Namespace, config) -> list:
    """One repeat's (variant, config) pairs, in the order they run."""
    import runner
    from variants import SINGLE_VARIANTS, VARIANTS

    if args.single:
        intervals = [int(n) for n in args.single_every.split(",")]
        return runner.single_schedule(choose(SINGLE_VARIANTS, args.variants),
                                      config, intervals)
    return [(v, config) for v in choose(VARIANTS, args.variants)]


def checkpoint_size(runs: list[dict], config) -> int:
    """The bytes of one checkpoint: a plain Keras `.keras` file's if a
    run wrote one, else the model's state bytes."""
    sizes = [r["checkpoint_bytes"] for r in runs
             if r["name"] == "keras" and r.get("checkpoint_bytes")]
    return sizes[0] if sizes else config.state_bytes


def measure(args: argparse.Namespace, config, scratch: str) -> dict:
    """Runs the schedule, the raw write and (with --sweep) the sweep."""
    import runner
    from raw_writes import raw_write_seconds
    from report import mark_slow, summarize

    runs = runner.run_schedule(schedule_of(args, config), args.repeats,
                               scratch)
    raw_write = raw_write_seconds(checkpoint_size(runs, config), scratch)
    slow = mark_slow(runs, BASELINE)
    return {
        "variants": summarize(runs, BASELINE, raw_write["cpu_s"]),
        "runs": runs,
        "slow_runs": [{key: run[key] for key in
                       ("name", "every", "repeat", "slow_reason")}
                      for run in slow],
        "raw_write": raw_write,
        "sweep": runner.sweep(args, scratch) if args.sweep else {},
    }


def title_of(args: argparse.Namespace, config, placement: dict,
             threads: dict) -> str:
    state = f"{config.state_bytes / 2**20:.0f} MiB state"
    if args.single:
        what = (f"ModelCheckpoint alone, {config.width}-wide MLP, {state}, "
                f"checkpoint every {args.single_every.replace(',', '/')} "
                f"steps")
    else:
        what = (f"{config.width}-wide MLP, {state}, checkpoint every "
                f"{config.save_every} steps")
    if placement["pinned"]:
        where = (f"pinned: training on CPU {placement['trainer_cpus']}, "
                 f"asynccb's workers on CPUs {placement['worker_cpus']}")
    elif config.threads == "apart":
        where = (f"training's threads apart (driver on CPU "
                 f"{placement['allowed_cpus'][0]}, TensorFlow's on "
                 f"{placement['allowed_cpus'][1]}), asynccb's workers on "
                 f"CPUs {placement['allowed_cpus']}")
    else:
        where = f"not pinned (CPUs {placement['allowed_cpus']})"
    return (f"{what}, TF threads {threads['tf_intra_threads']} intra-op / "
            f"{threads['tf_inter_threads']} inter-op, {where}")


def stem_of(args: argparse.Namespace) -> str:
    size = args.preset if not args.width else args.width
    return ("heavy_checkpointing" + ("-single" if args.single else "")
            + f"-{size}-tf{args.tf_threads}" + ("-pinned" if args.pin else "")
            + ("-apart" if args.threads_apart else ""))


def write_outputs(args, document: dict, title: str) -> tuple[str, list[str]]:
    """The JSON file and the plots; returns their paths (plots: names)."""
    from report import plot_sweep, plot_throughput, write_json

    os.makedirs(args.output, exist_ok=True)
    stem = stem_of(args)
    json_path = os.path.join(args.output, stem + ".json")
    write_json(json_path, document)
    plots = []
    if not args.single and plot_throughput(
            document["variants"], os.path.join(args.output, stem + ".png"),
            title):
        plots.append(stem + ".png")
    if document["sweep"] and plot_sweep(
            document["sweep"], os.path.join(args.output, stem + "-sweep.png")):
        plots.append(stem + "-sweep.png")
    return json_path, plots


def print_report(args, document: dict, title: str, json_path: str,
                 plots: list[str]) -> None:
    from report import markdown_table, slow_warning, sweep_tables

    raw = document["raw_write"]
    print(f"\n{title}; {args.repeats} interleaved repeats, medians; "
          f"'vs none': paired ratio to the same repeat's no-callback run"
          + ("" if args.pin else " (its threads kept on two CPUs)")
          + ".\n")
    print(markdown_table(document["variants"], by_interval=args.single))
    print("\nCPU/ckpt: (CPU of the run, trainer + workers, minus its "
          "repeat's no-callback run's) per checkpoint written in the "
          "measured window"
          + ("" if args.single else
             " (includes the other callbacks and the memcpy floor)")
          + f". Raw write of {raw['bytes'] / 2**20:.1f} MiB (os.write, "
          f"8 MiB chunks, fsync; median of {raw['repeats']}): "
          f"{raw['cpu_s'] * 1e3:.1f} ms CPU, {raw['wall_s'] * 1e3:.1f} ms.")
    warning = slow_warning(document["slow_runs"])
    if warning:
        print(warning)
    if document["sweep"]:
        print()
        print(sweep_tables(document["sweep"]))
    print(f"\nJSON: {json_path}"
          + (f"; plots: {', '.join(plots)}" if plots else "")
          + f"; {document['seconds']:.0f} s in all.")


def main(argv=None) -> dict:
    args = parse_args(argv)
    placement = {"pinned": False, "trainer_cpus": None, "worker_cpus": None}
    allowed = (sorted(os.sched_getaffinity(0))
               if hasattr(os, "sched_getaffinity") else None)
    if args.pin and args.threads_apart:
        sys.exit("--pin keeps training to one CPU: its threads cannot be "
                 "apart (--threads-apart).")
    if args.pin:  # Before TensorFlow starts a thread.
        placement = pin_cpus()
    elif args.threads_apart:
        if not allowed or len(allowed) < 2:
            sys.exit(f"--threads-apart needs at least 2 CPUs; this process "
                     f"may use only {allowed}.")
        import asynccb  # Lazy: does not load TensorFlow.

        # Threads inherit the CPUs of the thread that starts them: without
        # this, workers started while training's thread is kept to one CPU
        # would stay on it.
        asynccb.configure_workers(cpus=set(allowed))
        placement["worker_cpus"] = allowed
    placement["allowed_cpus"] = allowed
    threads = configure_tensorflow(args.tf_threads)
    config = make_config(args)
    scratch = tempfile.mkdtemp(prefix="asynccb-bench-")
    started = time.perf_counter()
    try:
        measured = measure(args, config, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    import keras
    import tensorflow as tf

    title = title_of(args, config, placement, threads)
    document = {
        "config": {**vars(config), "tf_threads": args.tf_threads, **threads,
                   "repeats": args.repeats, "preset": args.preset,
                   "mode": "single" if args.single else "heavy",
                   "single_every": ([int(n) for n in
                                     args.single_every.split(",")]
                                    if args.single else None),
                   **placement},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "keras": keras.__version__},
        "title": title,
        "seconds": time.perf_counter() - started,
        **measured,
    }
    json_path, plots = write_outputs(args, document, title)
    print_report(args, document, title, json_path, plots)
    return document


if __name__ == "__main__":
    main()
