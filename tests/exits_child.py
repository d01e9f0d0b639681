"""A training process for the exit tests, run as a script.

It checkpoints every 4 steps (`.keras`, one file per step) with saves
that wait at a gate (see `gated.py`), so they pile up queued, and says on
stdout, unbuffered, each checkpoint handed over ("due <name>": the hook
has returned to Keras, the save is asynccb's to finish) and when `--due`
of them were ("ready"). How the run then ends is the test's choice:

    --hold PATH   after "ready", wait in a callback at this gate (the
                  test sends SIGTERM meanwhile)
    --own-handler install a SIGTERM handler of the user's own first: it
                  says "handler <files on disk>" and stops training
    --open-run    drive the callbacks by hand and leave the script with
                  the run open (no `on_train_end`): its callbacks are
                  dropped as `main` returns
    --keep        with --open-run, keep them (a module global): the run
                  is still open at interpreter exit
    --plain       plain Keras, no asynccb (the reference)
    --list        the callbacks in an AsyncCallbackList
    --say-blocked say "blocked queue" or "blocked snapshots" once the
                  training thread waits in asynccb for the queue (room in
                  it, or its end) or for a snapshot buffer; and "listed"
                  once asynccb has listed what it did not do
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from conftest import mnist_like  # noqa: E402
from crossproc import Signal  # noqa: E402
from gated import gated_model  # noqa: E402

import asynccb  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

SAVE_EVERY = 4
KEPT: list = []  # With --keep: what stays referenced until exit.


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


class Announce(keras.callbacks.Callback):
    """After the checkpoint's hook: names each checkpoint handed over."""

    def __init__(self, due: int, hold: str | None):
        super().__init__()
        self.due, self.hold = due, hold
        self.count = 0
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % SAVE_EVERY:  # Epochs are a multiple of it.
            return
        self.count += 1
        say(f"due {self.epoch + 1:02d}-{batch + 1:03d}.keras")
        if self.count == self.due:
            say("ready")
            self.ready()

    def ready(self) -> None:
        """What happens once `due` checkpoints were handed over."""
        if self.hold:
            Signal.attach(self.hold).wait(120)  # SIGTERM comes meanwhile.


class _SayListed(logging.Handler):
    def emit(self, record):
        if "this was not done" in record.getMessage():
            say("listed")


def _say_when_blocked(wrapped: asynccb.AsyncCallback) -> None:
    """Says when the training thread first waits in asynccb (asynccb's
    internals: the wrapper's queue and its snapshot pool), and when
    asynccb lists what it did not do."""
    log = logging.getLogger("asynccb")
    log.addHandler(_SayListed(logging.ERROR))
    log.addHandler(logging.StreamHandler())  # Python's last resort no more.
    waits = {"queue": wrapped._lane.channel.wait_producer_blocked,
             "snapshots": wrapped._dispatcher.pool.wait_blocked}
    for what, wait in waits.items():
        def watch(what=what, wait=wait):
            if wait(120):  # Failure guard only.
                say(f"blocked {what}")
        threading.Thread(target=watch, daemon=True).start()


def main() -> None:
    # Ctrl-C raises KeyboardInterrupt, as at a terminal, even when the test
    # run was started in the background (a shell then has its children
    # ignore SIGINT, and Python keeps that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--executor", default="thread")
    parser.add_argument("--gate", help="the saves' gate (none: ungated)")
    parser.add_argument("--hold")
    parser.add_argument("--due", type=int, default=12)
    parser.add_argument("--grace", type=float, default=60.0)
    parser.add_argument("--max-pending", type=int, default=64,
                        help="the queue bound, and the snapshots'")
    parser.add_argument("--max-snapshots", type=int,
                        help="the snapshots' bound, if not --max-pending")
    parser.add_argument("--say-blocked", action="store_true")
    parser.add_argument("--own-handler", action="store_true")
    parser.add_argument("--open-run", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="with --open-run: keep the callbacks until "
                             "the interpreter exits")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--list", action="store_true",
                        help="in an AsyncCallbackList (else Keras' list)")
    args = parser.parse_args()

    model = gated_model(args.gate)
    checkpoint = keras.callbacks.ModelCheckpoint(
        os.path.join(args.dir, "{epoch:02d}-{batch:03d}.keras"),
        save_freq=SAVE_EVERY)
    if not args.plain:
        checkpoint = asynccb.AsyncCallback(
            checkpoint, executor=args.executor, max_pending=args.max_pending,
            max_snapshots=args.max_snapshots or args.max_pending,
            exit_grace=args.grace)
    announce = Announce(args.due, args.hold)
    callbacks: list | asynccb.AsyncCallbackList = [checkpoint, announce]
    if args.list:
        callbacks = asynccb.AsyncCallbackList(
            callbacks, model=model, add_history=True, exit_grace=args.grace,
            max_snapshots=args.max_snapshots or args.max_pending)
    if args.say_blocked:
        _say_when_blocked(checkpoint)
    if args.own_handler:
        def stop(signum, frame):
            files = [n for n in os.listdir(args.dir) if n.endswith(".keras")]
            say(f"handler {len(files)}")
            model.stop_training = True

        signal.signal(signal.SIGTERM, stop)
    x, y = mnist_like(SAVE_EVERY * 16 * 8)
    if args.open_run:
        callbacks = keras.callbacks.CallbackList(
            [checkpoint, announce], model=model)
        callbacks.on_train_begin()
        callbacks.on_epoch_begin(0)
        for step in range(args.due * SAVE_EVERY):
            batch = slice(step * 8, (step + 1) * 8)
            model.train_on_batch(x[batch], y[batch])
            callbacks.on_train_batch_end(step)
        if args.keep:
            KEPT.append(callbacks)
        say("leaving")
        return  # The run is left open: the interpreter exits.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=callbacks)
    say("returned")


if __name__ == "__main__":
    main()
