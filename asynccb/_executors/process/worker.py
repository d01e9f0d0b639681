"""The main function of a worker process (spawned, one per callback).

Started as `python -m asynccb._executors.process.worker <socket fd>
<lifeline fd>` with an environment that hides accelerators and limits
threads. `initialize` sets the process up before TensorFlow loads (lower
priority, deaf to Ctrl-C, which the training process handles) and takes
the `Init` message; `serve` then runs the lane's tasks (`messages.py`)
until told to stop, or until the training process dies: the lifeline
pipe's end closes with it, and the worker exits within moments.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from asynccb._executors.process import messages
from asynccb._executors.process.messages import USE_BLUEPRINT

__all__ = ["main", "initialize", "serve"]


def _set_up_process() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(5)  # Training comes first when they compete for a core.
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], "GPU")


def _exit_with_parent(lifeline: int) -> None:
    # Nothing is ever written to the lifeline: the read returns (empty)
    # when the training process closes it, by exiting or by dying. Then
    # exit at once, without leaving a half-written temporary file.
    os.read(lifeline, 1)
    from asynccb._saving import remove_in_progress

    remove_in_progress()
    os._exit(0)


def _callback_state(callback: Any) -> dict[str, bytes]:
    """The callback's attributes that can travel back, each pickled on its
    own (so one that cannot load in the training process costs only
    itself), but its model."""
    state = {}
    for name, value in vars(callback).items():
        if name == "_model":
            continue
        try:
            state[name] = pickle.dumps(value)
        except Exception:
            continue  # Open files, writers: they stay the training side's.
    return state


@dataclass
class _Lane:
    """What a worker holds for its lane between messages."""

    runner: Any  # TaskRunner
    buffers: Any  # SharedBuffers
    blueprint_data: bytes | None = None
    blueprint: Any = None  # Loaded from `blueprint_data` when first needed.


def initialize(conn: Any, lifeline: int) -> _Lane:
    """Sets the process up and takes the `Init` message; replies `Ready`."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,),
                     daemon=True).start()
    _set_up_process()

    from asynccb._executors.process.shared_memory import SharedBuffers
    from asynccb._tasks import TaskRunner

    init = messages.decode(conn.recv_bytes())
    assert isinstance(init, messages.Init), init
    sys.path[:] = init.sys_path  # Where the training process finds code.
    lane = _Lane(TaskRunner(None, init.deferred_control),
                 SharedBuffers(init.capacity))
    conn.send_bytes(messages.encode(messages.Ready()))
    return lane


def _run(lane: _Lane, message: messages.RunTask) -> messages.Done:
    """Loads the task (and what it names) and runs it: every load and
    every mapping here, where a failure is reported."""
    import numpy as np

    task = pickle.loads(message.task)
    try:
        if task.model == USE_BLUEPRINT:
            if lane.blueprint is None:
                lane.blueprint = pickle.loads(lane.blueprint_data)
            task.model = lane.blueprint
        snapshot = task.snapshot
        if snapshot is not None:
            snapshot.data = (
                np.empty(0, np.uint8) if snapshot.name is None
                else lane.buffers.array(snapshot.name,
                                        snapshot.layout.nbytes))
        if message.callback is not None:
            lane.runner.callback = pickle.loads(message.callback)
        return messages.Done(lane.runner.run(task))
    finally:
        task.snapshot = None  # Unmapped with the last view of it.


def serve(conn: Any, lane: _Lane) -> None:
    """Runs the lane's messages until `Stop`."""
    try:
        while True:
            message = messages.decode(conn.recv_bytes())
            if isinstance(message, messages.Stop):
                return
            if isinstance(message, messages.Blueprint):
                lane.blueprint_data, lane.blueprint = message.data, None
                continue
            if isinstance(message, messages.Finish):
                callback = lane.runner.callback
                reply: Any = messages.State(
                    _callback_state(callback) if callback is not None else {})
            else:
                try:
                    reply = _run(lane, message)
                except BaseException as exc:
                    reply = messages.Failed(messages.ExceptionReport.of(exc))
            conn.send_bytes(messages.encode(reply))
    finally:
        lane.runner.close()
        lane.buffers.close()


def main(conn: Any, lifeline: int) -> None:
    """Serves one offloaded callback; see the module docstring."""
    serve(conn, initialize(conn, lifeline))
    # Asked to stop, with nothing left to do: skip the interpreter's
    # teardown (unloading TensorFlow takes seconds), which the training
    # process would otherwise wait for at the end of every run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    from multiprocessing.connection import Connection

    # Run as the importable module, not as `__main__`, so that what the
    # messages name is loaded once.
    from asynccb._executors.process.worker import main as _main

    _main(Connection(int(sys.argv[1])), int(sys.argv[2]))
