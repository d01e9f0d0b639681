"""The main function of a warm worker process (one per training process,
or as many as `configure_workers(processes=n)` asks).

Started as `python -m asynccb._executors.process.worker <socket fd>
<lifeline fd> [<cpus>]` with an environment that hides accelerators and limits
threads. `initialize` sets the process up before TensorFlow loads (lower
priority, deaf to Ctrl-C, which the training process handles) and takes
the `Init` message; `serve` then runs the lanes' messages (`messages.py`),
each lane on a thread of its own (one callback's hooks in order, a slow
callback never delaying another), until told to stop, or until the
training process dies: the lifeline pipe's end closes with it, and the
worker exits within moments.
"""

from __future__ import annotations

import os
import pickle
import queue
import signal
import sys
import threading
from typing import Any

import cloudpickle

from asynccb._executors.process import messages
from asynccb._executors.process.messages import USE_BLUEPRINT

__all__ = ["main", "initialize", "serve"]


def _set_up_process() -> None:
    # Ctrl-C, and a SIGTERM sent to the whole job (Slurm, `timeout`, a
    # process group), are the training process' to handle: it may still
    # need this worker to finish the saves it accepted. When it ends, the
    # lifeline ends this worker too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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


def _callback_state(callback: Any
                    ) -> tuple[dict[str, bytes], dict[str, str]]:
    """The callback's attributes that can travel back, each pickled on its
    own (so one that cannot load in the training process costs only
    itself), but its model. Returns them, and the skipped ones with why.

    An attribute that cannot be pickled by nature stays the training
    side's, as by design: Python raises `TypeError` for locks, generators
    and the like, cloudpickle `PicklingError` for files (a `CSVLogger`'s,
    closed at the end of its run), TensorFlow `InvalidArgumentError` for
    resource tensors (a `TensorBoard`'s summary writers). Any other error
    is reported back, to be logged there.
    """
    import tensorflow as tf

    unpicklable = (TypeError, pickle.PicklingError,
                   tf.errors.InvalidArgumentError)
    attributes, skipped = {}, {}
    for name, value in vars(callback).items():
        if name == "_model":
            continue
        try:
            # By value, as the callback came: a function or class of the
            # user's script names a `__main__` that here is the worker's.
            attributes[name] = cloudpickle.dumps(value)
        except unpicklable:
            continue
        except Exception as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return attributes, skipped


class _Lane:
    """One lane in the worker: its runner and its shadow's source, and the
    thread that runs its messages in order.

    The runner and the shadow outlive a run: the next run of the same
    callback, on the same model, rebuilds nothing.
    """

    def __init__(self, number: int, open_: messages.Open, reply: Any,
                 buffers: Any):
        from asynccb._tasks import TaskRunner

        self.number = number
        self.runner = TaskRunner(None, open_.deferred_control)
        self.buffers = buffers  # The worker's mappings, shared.
        self.capacity = open_.capacity
        buffers.grow(open_.capacity)
        self.blueprint_data: bytes | None = None
        self.blueprint: Any = None  # Loaded when first needed.
        self.layout: Any = None  # The last snapshot layout sent.
        self._reply = reply
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name=f"asynccb-lane-{number}", daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._inbox.put(message)

    def close(self) -> None:
        """Ends its thread once the messages before this one are done, and
        gives back its share of the worker's mappings."""
        self._inbox.put(None)
        self._thread.join()
        self.buffers.shrink(self.capacity)

    def _serve(self) -> None:
        try:
            while (message := self._inbox.get()) is not None:
                if isinstance(message, messages.Blueprint):
                    self.blueprint_data, self.blueprint = message.data, None
                    continue
                try:
                    reply: Any = self._answer(message)
                except BaseException as exc:  # `sys.exit` in a hook too.
                    reply = messages.Failed(
                        self.number, messages.ExceptionReport.of(exc))
                self._reply(reply)
        finally:
            self.runner.close()

    def _answer(self, message: Any) -> Any:
        """Runs a task (`Done`) or, at the end of a run, pickles the
        callback's attributes (`State`): either may raise anything."""
        if isinstance(message, messages.Finish):
            callback = self.runner.callback
            attributes, skipped = (_callback_state(callback)
                                   if callback is not None else ({}, {}))
            return messages.State(self.number, attributes, skipped)
        return messages.Done(self.number, self._run(message))

    def _run(self, message: messages.RunTask) -> dict[str, Any]:
        """Loads the task (and what it names) and runs it: every load and
        every mapping here, where a failure is reported."""
        import numpy as np

        task = pickle.loads(message.task)
        try:
            if task.model == USE_BLUEPRINT:
                if self.blueprint is None:
                    # The training process sends a lane's `Blueprint`
                    # before the first task that uses it.
                    assert self.blueprint_data is not None, "no blueprint"
                    self.blueprint = pickle.loads(self.blueprint_data)
                task.model = self.blueprint
            snapshot = task.snapshot
            if snapshot is not None:
                if snapshot.layout is None:  # The last task's, not resent.
                    snapshot.layout = self.layout
                self.layout = snapshot.layout
                snapshot.data = (
                    np.empty(0, np.uint8) if snapshot.name is None
                    else self.buffers.array(snapshot.name,
                                            snapshot.layout.nbytes))
            if message.callback is not None:
                self.runner.callback = pickle.loads(message.callback)
            return self.runner.run(task)
        finally:
            task.snapshot = None  # Unmapped with the last view of it.


def initialize(conn: Any, lifeline: int) -> None:
    """Sets the process up and takes the `Init` message; replies `Ready`."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,),
                     daemon=True).start()
    _set_up_process()
    # What the lanes' threads import, loaded once, here.
    import asynccb._executors.process.shared_memory  # noqa: F401
    import asynccb._tasks  # noqa: F401

    init = messages.decode(conn.recv_bytes())
    assert isinstance(init, messages.Init), init
    sys.path[:] = init.sys_path  # Where the training process finds code.
    conn.send_bytes(messages.encode(messages.Ready()))


def serve(conn: Any) -> None:
    """Routes each message to its lane's thread until `Stop`; replies go
    back from the lanes' threads, one at a time."""
    lock = threading.Lock()

    def reply(message: Any) -> None:
        with lock:
            conn.send_bytes(messages.encode(message))

    from asynccb._executors.process.shared_memory import SharedBuffers

    buffers = SharedBuffers(0)
    lanes: dict[int, _Lane] = {}
    try:
        while True:
            message = messages.decode(conn.recv_bytes())
            if isinstance(message, messages.Stop):
                return
            if isinstance(message, messages.Init):  # `sys.path` changed.
                sys.path[:] = message.sys_path
            elif isinstance(message, messages.Open):
                lanes[message.lane] = _Lane(message.lane, message, reply,
                                            buffers)
            elif isinstance(message, messages.Close):
                lane = lanes.pop(message.lane, None)
                if lane is not None:
                    lane.close()
            else:
                assert isinstance(message, (messages.Blueprint,
                                            messages.RunTask,
                                            messages.Finish)), message
                lanes[message.lane].put(message)
    finally:
        for lane in lanes.values():
            lane.close()
        buffers.close()


def main(conn: Any, lifeline: int) -> None:
    """Serves the lanes of one training process; see the docstring."""
    initialize(conn, lifeline)
    serve(conn)
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

    if len(sys.argv) > 3:  # `configure_workers(cpus=...)`, before any
        # thread starts: TensorFlow's inherit it.
        os.sched_setaffinity(0, {int(cpu) for cpu in sys.argv[3].split(",")})
    _main(Connection(int(sys.argv[1])), int(sys.argv[2]))
