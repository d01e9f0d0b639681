"""The training side of one lane in the worker process: feed it, watch it.

The callback travels once per run, cloudpickled; the shadow model is
rebuilt in the worker from the model's blueprint (custom classes travel by
value), once per model; snapshots travel through shared memory, by name.
Every wait on the worker also sees its death (`pool.py`), so a dead worker
is an error at once, never a hang.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.machinery
import logging
import pickle
import sys
import weakref
from typing import Any

import cloudpickle

from asynccb._errors import WorkerDiedError
from asynccb._executors.process import messages, pool
from asynccb._executors.process.messages import USE_BLUEPRINT, SnapshotRef
from asynccb._saving import remove_temporaries
from asynccb._snapshot import Snapshot
from asynccb._tasks import Task

__all__ = ["ProcessRunner", "pickle_callback"]

logger = logging.getLogger("asynccb")


def _travel_by_value(classes: Any) -> None:
    """Makes cloudpickle copy, rather than name, the modules of `classes`
    that a worker could not import (loaded from a path no longer on
    `sys.path`, or built at run time). `__main__` always travels by value.
    """
    for cls in classes:
        for base in getattr(cls, "__mro__", (cls,)):
            name = getattr(base, "__module__", None)
            if name is None or name in ("__main__", "builtins"):
                continue
            module = sys.modules.get(name)
            if module is None:
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


class ProcessRunner:
    """The training side of one lane in a warm worker process.

    Used by the lane like an in-process `TaskRunner`: `run(task)` returns
    the task's control effects or raises the worker's exception. Workers
    (see `pool.py`) are shared by every process-offloaded callback and
    outlive the run; the lane in its worker, with its shadow model, lives
    as long as this runner and that worker's service: a later run of an
    unchanged model on the same worker rebuilds nothing.

    Args:
        callback: The wrapped callback, or `None` for a lane that only
            saves (its callback stays in the training process).
        deferred_control: As for `TaskRunner`.

    Attributes:
        capacity: How many snapshot buffers the worker may keep mapped.
        sentinel: The worker's pidfd while attached (readable once it
            died), or `None`.
    """

    def __init__(self, callback: Any, deferred_control: bool):
        self.callback = callback
        self.deferred_control = deferred_control
        self.capacity = 1
        self.payload: bytes | None = None
        self.sentinel: int | None = None
        self._worker: pool.WorkerProcess | None = None  # While attached.
        self._lane: tuple[pool.WorkerProcess, int] | None = None
        self._blueprint: Any = None  # The last one the lane was sent.
        self._layout: Any = None  # The last snapshot layout it was sent.
        self._finalizer: Any = None

    def prepare_callback(self) -> None:
        """Pickles the callback now, on the training thread, so that one
        that cannot travel fails before training starts. It travels with
        the next `set_model` (or `attach`) task."""
        if self.callback is not None:
            self.payload = pickle_callback(self.callback)

    def start(self, name: str) -> None:
        """Attaches to the warm worker for a run (starting it if needed:
        it imports TensorFlow, seconds) and opens this lane in it, once per
        worker. Runs on the forwarding thread."""
        worker = self._worker = pool.acquire(
            self._lane[0] if self._lane is not None else None)
        self.sentinel = worker.sentinel
        worker.follow_path()
        if self._lane is None or self._lane[0] is not worker:
            self._close_lane()
            number = worker.open_lane(self.deferred_control, self.capacity)
            self._lane = (worker, number)
            self._blueprint = None  # A new lane has no shadow yet.
            self._layout = None
            self._finalizer = weakref.finalize(self, worker.close_lane,
                                               number)
            # Not at interpreter exit: a run still open then is finished
            # first (`_dispatcher._close_all`), through this lane; the
            # worker exits with this process anyway.
            self._finalizer.atexit = False

    def _close_lane(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # Closes the lane in its worker, once.
            self._finalizer = None
        self._lane = None

    # Below, attached: between `start` and `stop`, the lane open in the
    # worker (a lane whose `start` failed has failed: it runs no task,
    # watches no worker and does not `finish`).

    def _send(self, message: messages.ToWorker) -> None:
        assert self._worker is not None, "not attached"
        self._worker.send(message)

    def _receive(self, doing: str, expected: type) -> Any:
        assert self._worker is not None and self._lane is not None, (
            "not attached")
        return self._worker.receive(self._lane[1], doing, expected)

    def death(self, doing: str) -> WorkerDiedError:
        """The error for the worker, found dead while `doing` something."""
        assert self._worker is not None, "not attached"
        return self._worker.died_error(doing)

    def run(self, task: Task) -> dict:
        """Runs `task` in the worker; returns its control effects."""
        assert self._worker is not None and self._lane is not None, (
            "not attached")
        number = self._lane[1]
        if task.model is not None:
            if task.model is not self._blueprint:
                self._send(messages.Blueprint(number, dumps_for_worker(
                    task.model, task.model.custom_objects.values())))
                self._blueprint = task.model
            model = USE_BLUEPRINT
        else:
            model = None
        snapshot = task.snapshot
        ref = None
        if snapshot is not None:
            assert isinstance(snapshot, Snapshot), snapshot  # Ours, not a ref.
            # A layout travels once: slots and signature, per variable.
            layout = snapshot.layout
            sent = None if layout is self._layout else layout
            self._layout = layout
            ref = SnapshotRef(
                snapshot.buffer.name if snapshot.buffer is not None else None,
                sent, snapshot.stop_training, snapshot.serial)
        # Every other field as it is (a save's `fast` switch included).
        remote = dataclasses.replace(task, snapshot=ref, model=model)
        payload = None
        if task.kind in ("set_model", "attach"):
            # The callback as it is when its run starts, sent with its model.
            payload, self.payload = self.payload, None
        self._send(messages.RunTask(number, cloudpickle.dumps(remote),
                                    payload))
        try:
            done = self._receive(f"running {task.describe()}", messages.Done)
        except WorkerDiedError:
            if task.kind == "save":  # Killed mid-save: tidy up after it.
                remove_temporaries(task.args[0], self._worker.pid)
            raise
        return done.effects

    def finish(self) -> None:
        """Copies the worker's callback state back onto the user's object,
        so that after `fit` it holds what plain Keras would have left."""
        assert self._lane is not None, "not attached"
        self._send(messages.Finish(self._lane[1]))
        state = self._receive("returning the callback's state",
                              messages.State)
        if self.callback is None:
            return
        for name, why in state.skipped.items():
            logger.warning(
                "asynccb: %s.%s stays as it was before the run: its value "
                "in the worker could not be pickled (%s).",
                type(self.callback).__name__, name, why)
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
        """Detaches from the worker at the end of the run; the worker and
        this lane in it stay warm (a dead worker's lane is dropped)."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        self.sentinel = None
        if not worker.alive:
            self._close_lane()
        pool.release(worker)

    def close(self) -> None:
        """End of run (lane side): nothing to drop in this process."""
