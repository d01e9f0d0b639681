"""The training side of a worker process: start it, feed it, watch it.

The callback travels once per run, cloudpickled; the shadow model is
rebuilt in the worker from the model's blueprint (custom classes travel by
value); snapshots travel through shared memory, by name. Every wait on the
worker also waits on its process sentinel, so a dead worker is an error at
once, never a hang.
"""

from __future__ import annotations

import copy
import importlib.machinery
import logging
import os
import pickle
import socket
import subprocess
import sys
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle

from asynccb._errors import WorkerDiedError
from asynccb._executors.process import messages
from asynccb._executors.process.messages import USE_BLUEPRINT, SnapshotRef
from asynccb._saving import remove_temporaries
from asynccb._tasks import Task

__all__ = ["ProcessRunner", "pickle_callback", "WORKER_MODULE"]

WORKER_MODULE = "asynccb._executors.process.worker"

logger = logging.getLogger("asynccb")

_STOP_TIMEOUT_S = 30  # A worker told to stop is killed if still alive then.

# Read by TensorFlow when it loads in the worker: no accelerator (training
# owns it), one thread each (training owns the cores).
WORKER_ENVIRONMENT = {
    "PYTHONUNBUFFERED": "1",  # A callback's prints appear when printed.
    "CUDA_VISIBLE_DEVICES": "-1",
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}


def _travel_by_value(classes: Any) -> None:
    """Makes cloudpickle copy, rather than name, the modules of `classes`
    that a worker could not import (loaded from a path no longer on
    `sys.path`, or built at run time). `__main__` always travels by value.
    """
    for cls in classes:
        for base in getattr(cls, "__mro__", (cls,)):
            name = getattr(base, "__module__", None)
            module = sys.modules.get(name or "")
            if module is None or name in ("__main__", "builtins"):
                continue
            # Look on `sys.path`, as the worker will (`importlib.util.
            # find_spec` would answer from `sys.modules`).
            top = name.partition(".")[0]
            if importlib.machinery.PathFinder.find_spec(top, sys.path) is None:
                cloudpickle.register_pickle_by_value(module)


def dumps_for_worker(obj: Any, classes: Any) -> bytes:
    """Cloudpickles `obj`, whose user-defined `classes` must reach a worker
    process by value if it could not import them."""
    _travel_by_value(classes)
    return cloudpickle.dumps(obj)


def pickle_callback(callback: Any) -> bytes:
    """The callback, cloudpickled without its model, for a worker.

    Raises:
        TypeError: If it cannot be pickled; the message names the
            attributes that cannot, and suggests the thread executor.
    """
    detached = copy.copy(callback)
    detached._model = None  # The worker gives it a shadow.
    try:
        return dumps_for_worker(detached, [type(callback)])
    except Exception as exc:
        culprits = []
        for name, value in vars(detached).items():
            try:
                cloudpickle.dumps(value)
            except Exception as attribute_exc:
                culprits.append(f"{name!r} ({type(value).__name__}: "
                                f"{attribute_exc})")
        what = ("attribute " + ", ".join(culprits)) if culprits else (
            "its class")
        raise TypeError(
            f"{type(callback).__name__} cannot be sent to a worker process: "
            f"{what} cannot be pickled. Use executor='thread' (which shares "
            "memory), or make the attribute picklable (create it in "
            f"`on_train_begin`). Received: callback={type(callback).__name__}"
        ) from exc


def _sentinel(pid: int) -> int | None:
    """A pidfd: readable when process `pid` exits (Linux 5.3+). Elsewhere
    `None`, and a death shows as the end of the worker's socket."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class ProcessRunner:
    """The training side of one worker process; runs tasks in it.

    Used by the lane like an in-process `TaskRunner`: `run(task)` returns
    the task's control effects or raises the worker's exception.

    The worker is a fresh interpreter (`python -m
    asynccb._executors.process.worker`),
    like multiprocessing's spawn but without re-importing the user's main
    script, which a training script without an `if __name__ == "__main__"`
    guard would otherwise run again in every worker. Its environment hides
    accelerators and limits threads before TensorFlow loads.

    Args:
        callback: The wrapped callback, or `None` for a lane that only
            saves (its callback stays in the training process).
        deferred_control: As for `TaskRunner`.

    Attributes:
        capacity: How many snapshot buffers the worker may keep mapped.
    """

    def __init__(self, callback: Any, deferred_control: bool):
        self.callback = callback
        self.deferred_control = deferred_control
        self.capacity = 1
        self.payload: bytes | None = None
        self.process: subprocess.Popen | None = None
        self.sentinel: int | None = None
        self._name = ""
        self._conn: Connection | None = None
        self._lifeline: int | None = None
        self._blueprint: Any = None

    def prepare_callback(self) -> None:
        """Pickles the callback now, on the training thread, so that one
        that cannot travel fails before training starts. It travels with
        the next `set_model` (or `attach`) task."""
        if self.callback is not None:
            self.payload = pickle_callback(self.callback)

    def start(self, name: str) -> None:
        """Starts the worker and waits until it is ready (it imports
        TensorFlow: seconds). Runs on the forwarding thread."""
        self._name = name
        ours, theirs = socket.socketpair()
        lifeline_read, self._lifeline = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE,
                 str(theirs.fileno()), str(lifeline_read)],
                pass_fds=(theirs.fileno(), lifeline_read),
                env={**os.environ, **WORKER_ENVIRONMENT},
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            os.close(lifeline_read)
        self._conn = Connection(ours.detach())
        self.sentinel = _sentinel(self.process.pid)
        self._send(messages.Init(tuple(sys.path), self.deferred_control,
                                 self.capacity))
        self._receive("starting", messages.Ready)

    def _send(self, message: messages.ToWorker) -> None:
        self._conn.send_bytes(messages.encode(message))

    def _receive(self, doing: str, expected: type) -> Any:
        """The worker's reply, of type `expected`; raises the worker's
        exception (`Failed`) or its death."""
        ready = wait([self._conn] + ([self.sentinel] if self.sentinel else []))
        if self._conn in ready:
            try:
                reply = messages.decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                pass  # Its end closed as it died: report the death below.
            else:
                if isinstance(reply, messages.Failed):
                    raise reply.error.rebuild()
                if not isinstance(reply, expected):
                    raise RuntimeError(
                        f"asynccb: worker process asynccb-{self._name} "
                        f"replied {reply!r} while {doing}.")
                return reply
        raise self.death(doing)

    def death(self, doing: str) -> WorkerDiedError:
        """The error for a worker found dead while `doing` something."""
        exitcode = self.process.wait()
        error = WorkerDiedError(
            f"worker process asynccb-{self._name} (pid {self.process.pid}) "
            f"died while {doing}", exitcode=exitcode)
        how = (f"killed by {error.signal}" if error.signal
               else f"exit code {exitcode}")
        error.args = (f"{error.args[0]}: {how}",)
        return error

    def run(self, task: Task) -> dict:
        """Runs `task` in the worker; returns its control effects."""
        if task.model is not None:
            if task.model is not self._blueprint:
                self._send(messages.Blueprint(dumps_for_worker(
                    task.model, task.model.custom_objects.values())))
                self._blueprint = task.model
            model = USE_BLUEPRINT
        else:
            model = None
        snapshot = task.snapshot
        if snapshot is not None:
            snapshot = SnapshotRef(
                snapshot.buffer.name if snapshot.buffer is not None else None,
                snapshot.layout, snapshot.stop_training)
        remote = Task(task.kind, task.name, task.args, task.logs,
                      task.kwargs, snapshot=snapshot, model=model)
        payload = None
        if task.kind in ("set_model", "attach"):
            # The callback as it is when its run starts, sent with its model.
            payload, self.payload = self.payload, None
        self._send(messages.RunTask(cloudpickle.dumps(remote), payload))
        try:
            done = self._receive(f"running {task.describe()}", messages.Done)
        except WorkerDiedError:
            if task.kind == "save":  # Killed mid-save: tidy up after it.
                remove_temporaries(task.args[0], self.process.pid)
            raise
        return done.effects

    def finish(self) -> None:
        """Copies the worker's callback state back onto the user's object,
        so that after `fit` it holds what plain Keras would have left."""
        self._send(messages.Finish())
        state = self._receive("returning the callback's state",
                              messages.State)
        if self.callback is None:
            return
        for name, data in state.attributes.items():
            try:
                self.callback.__dict__[name] = pickle.loads(data)
            except Exception as exc:  # Its class does not load here.
                logger.warning(
                    "asynccb: %s.%s stays as it was before the run: its "
                    "value from the worker does not load here (%s: %s).",
                    type(self.callback).__name__, name,
                    type(exc).__name__, exc)

    def stop(self) -> None:
        """Stops the worker (asks, then kills) and closes its pipes."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                self._send(messages.Stop())
            except OSError:
                pass  # It is exiting already; wait below.
            try:
                process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for close, handle in ((Connection.close, self._conn),
                              (os.close, self.sentinel),
                              (os.close, self._lifeline)):
            if handle is not None:
                close(handle)
        self._conn = self.sentinel = self._lifeline = None
        self._blueprint = None

    def close(self) -> None:
        """End of run (lane side): nothing to drop in this process."""
