"""The dispatcher: a list's lanes, its run lifecycle and hook routing.

Taking and sharing snapshots is `_snapshotter.py`'s job; raising failures
and applying deferred control, `_feedback.py`'s; noticing a run that ended
without its end hook, `_run_watch.py`'s.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Iterator

from asynccb._feedback import (
    apply_deferred_control,
    log_late_failures,
    raise_failure,
)
from asynccb._hooks import copy_logs
from asynccb._lane import Lane
from asynccb._run_watch import RunWatch, keras_run_frame
from asynccb._shadow import ModelBlueprint, current_blueprint
from asynccb._snapshot import StateLevel, allocate_held
from asynccb._snapshotter import Snapshotter
from asynccb._stats import CallbackStats
from asynccb._tasks import Task

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.base import Executor

__all__ = ["Dispatcher"]

logger = logging.getLogger("asynccb")

_live_dispatchers: "weakref.WeakSet[Dispatcher]" = weakref.WeakSet()


class Dispatcher:
    """Routes hooks of offloaded callbacks to their lanes.

    One dispatcher serves an `AsyncCallbackList` (or a lone `AsyncCallback`):
    it queues each hook for its lane with the snapshot it needs (one
    shared by the lanes that need the model in the same dispatch), starts
    the executors at the first `on_*_begin`, drains and stops them at the
    last `on_*_end`, and raises a lane's failure on the training thread.

    Args:
        max_snapshots: How many snapshot buffers may be alive at once.
    """

    def __init__(self, max_snapshots: int):
        self.lanes: list[Lane] = []
        self.model: Any = None
        self.snapshotter = Snapshotter(max_snapshots)
        self.pool = self.snapshotter.pool
        self._depth = 0
        self._executors: dict[str, Executor] = {}
        self._running = False
        self._lifecycle = threading.RLock()
        self._watch: RunWatch | None = None
        _live_dispatchers.add(self)

    # Configuration.

    def add_lane(self, lane: Lane) -> None:
        names = {existing.name for existing in self.lanes}
        base, number = lane.name, 2
        while lane.name in names:
            lane.name = f"{base}#{number}"
            number += 1
        lane.on_failure = self._interrupt
        with self._lifecycle:
            self.lanes.append(lane)
            if self._running:  # Appended to a list already at work.
                self._start_lane(lane)

    def set_model(self, model: Any) -> None:
        if model is not self.model:
            self.model = model
            self.snapshotter.forget_layouts()

    def blueprint(self) -> ModelBlueprint | None:
        """The live model's blueprint, retaken when its variables changed.

        Taken on the training thread, so a model that cannot be rebuilt
        fails when it is set, before training starts.

        Raises:
            ValueError: If the model cannot be serialized.
        """
        if self.model is None:
            return None
        return current_blueprint(self.model)

    # Run lifecycle.

    def begin(self) -> None:
        """Enters a run (`on_*_begin`); the outermost starts the workers."""
        with self._lifecycle:
            self._depth += 1
            if self._depth == 1:
                for lane in self.lanes:
                    if not lane.attached and lane.live_model is not None:
                        self._attach(lane)
                self.start()
                self._reserve()
                self._watch_run()

    def end(self) -> None:
        """Leaves a run (`on_*_end`); the outermost drains and stops.

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        with self._lifecycle:
            if self._depth == 0:
                raise ValueError(
                    "`on_*_end` called without a matching `on_*_begin`."
                )
            self._depth -= 1
            if self._depth == 0:
                self.close()
        self.raise_failure()

    def start(self) -> None:
        """Starts a worker per lane; hooks queued before wait for it."""
        with self._lifecycle:
            if self._running:
                return
            self._running = True
            # Snapshots hold tensors, unless a lane's workers are in
            # another process (see `_start_lane`).
            self.pool.use(allocate_held)
            for lane in self.lanes:
                self._start_lane(lane)

    def _attach(self, lane: Lane) -> None:
        # A list reused for another run: Keras does not call `set_model`
        # again, but the callbacks got their live model back at the end of
        # the last run; give them their offloaded model again, silently.
        lane.attached = True
        if lane.saves_only:
            lane.callback._model = lane.offloaded_model
        else:
            lane.runner.prepare_callback()
            self.submit(lane, "attach", "attach", level=lane.setup_level)

    def _start_lane(self, lane: Lane) -> None:
        lane.channel.open()
        lane.runner.capacity = self.pool.capacity + 1
        kind = lane.kind
        if kind.crosses_processes:
            # Its workers read snapshots in place, from another process:
            # every snapshot of the run goes to memory they can map, from
            # now on (also when the lane joins a list already at work,
            # whose free buffers are private).
            self.pool.use(kind.allocate)
        executor = self._executors.get(kind.name)
        if executor is None:
            executor = self._executors[kind.name] = kind()
        executor.start(lane)

    def close(self, cancel: bool = False) -> None:
        """Finishes (or, with `cancel`, discards) queued hooks and stops.

        Afterwards no worker of this dispatcher runs, every snapshot buffer
        is freed, and each callback has its live model back.
        """
        with self._lifecycle:
            if not self._running:
                return
            self.snapshotter.end_window()
            try:
                self._stop_workers(cancel)
            except BaseException:
                # Interrupted while waiting (Ctrl-C): stop without waiting
                # for the queues, only for the hooks already running.
                self._stop_workers(cancel=True)
                raise
            finally:
                for lane in self.lanes:
                    lane.restore()
                self.snapshotter.close()  # Its layouts stay, for the next.
                self._depth = 0
                self._running = False
                if self._watch is not None:
                    self._watch.stop()
                    self._watch = None

    def _stop_workers(self, cancel: bool) -> None:
        for lane in self.lanes:
            if cancel:
                lane.cancel_pending()
            lane.channel.close()
        for executor in list(self._executors.values()):
            executor.stop()
        self._executors.clear()

    def _watch_run(self) -> None:
        frame = keras_run_frame()
        if frame is not None:
            self._watch = RunWatch(self, frame)

    def abandon(self, watch: RunWatch) -> bool:
        """Closes the run if `watch` confirms `fit` ended without its end
        hook (it raised). Returns whether it did."""
        if not self._lifecycle.acquire(blocking=False):
            return False  # The training thread is starting or ending a run.
        try:
            if not self._running:
                return True
            if watch.run_alive():
                return False
            logger.warning(
                "asynccb: %s ended without `on_*_end` (it raised); "
                "finishing the queued hooks of %s.",
                watch.where, ", ".join(lane.name for lane in self.lanes),
            )
            self.close()
        finally:
            self._lifecycle.release()
        log_late_failures(self.lanes)
        return True

    def wait(self) -> None:
        """Blocks until every call queued so far has run.

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        for lane in self.lanes:
            # Called only during `join`, while `lane` is this one.
            lane.channel.join(interrupted=lambda: lane.error is not None)
        self.check()

    # Errors and deferred control.

    def _interrupt(self) -> None:
        # A lane failed: wake the training thread if it waits on a queue or
        # on the pool, so it raises instead of waiting.
        self.pool.interrupt()
        for lane in self.lanes:
            lane.channel.interrupt()

    def check(self) -> None:
        """Raises a failure, applies deferred control: at every hook."""
        for lane in self.lanes:
            if lane.error is not None:
                self.close()
                self.raise_failure()
            apply_deferred_control(lane)

    def raise_failure(self) -> None:
        """Raises the first recorded failure (see `_feedback.py`)."""
        raise_failure(self.lanes)

    # Dispatch (training thread).

    @contextlib.contextmanager
    def dispatching(self) -> Iterator[None]:
        """Frames one hook call from Keras: a failure of an earlier hook is
        raised first; an exception during the call stops the workers (their
        queues discarded on Ctrl-C, finished otherwise); the sharing window
        of the call's snapshot closes at its end."""
        try:
            self.check()
            yield
        except BaseException as exc:
            self.close(cancel=isinstance(exc, KeyboardInterrupt))
            raise
        finally:
            self.end_dispatch()

    def end_dispatch(self) -> None:
        """Ends the sharing window of the current dispatch's snapshot."""
        self.snapshotter.end_window()

    def submit(
        self,
        lane: Lane,
        kind: str,
        name: str,
        args: tuple = (),
        logs: Any = None,
        kwargs: dict | None = None,
        level: StateLevel = StateLevel.NONE,
    ) -> None:
        """Queues work for `lane`, with a snapshot if `level` asks for one.

        Setup tasks (`set_model`, `set_params`) are not counted against the
        queue bound: they come once per run, before any hook.

        Raises:
            AsyncCallbackError: If a lane failed.
        """
        start = time.perf_counter()
        blocked = 0.0
        if kind in ("hook", "save"):  # Setup is not bounded: see above.
            blocked, dropped = lane.channel.make_room(
                lane.policy, interrupted=lambda: lane.error is not None
            )
            lane.record_drops(dropped)
            if lane.error is not None:
                self.check()
        with_snapshot = level > StateLevel.NONE and self.model is not None
        blueprint = None
        if lane.uses_model and (
            with_snapshot or kind in ("set_model", "attach", "save")
        ):
            blueprint = self.blueprint()  # May raise: before any worker.
        if not self._running:
            # Workers start as soon as the model is known; before the first
            # snapshot, whose buffer must be one a worker process can map.
            self.start()
        task = Task(kind, name, args, copy_logs(logs), kwargs or {},
                    model=blueprint, fast=lane.fast_saves)
        snapshot_s = 0.0
        if with_snapshot:
            task.snapshot, snapshot_s, waited = self.snapshotter.take(
                self.model, level, lane, self.check)
            blocked += waited
        lane.channel.put(task)
        lane.dispatched += 1
        elapsed = time.perf_counter() - start
        lane.blocked_time.add(blocked)
        if snapshot_s:
            lane.snapshot_time.add(snapshot_s)
        lane.enqueue_time.add(elapsed - blocked - snapshot_s)
        lane.dispatch_time.add(elapsed)

    def _reserve(self) -> None:
        if any(lane.saves_only for lane in self.lanes):  # Checkpoints.
            self.snapshotter.reserve(self.model)

    # Stats.

    @property
    def snapshots(self) -> int:
        return self.snapshotter.snapshots

    @property
    def snapshot_bytes(self) -> int:
        return self.snapshotter.snapshot_bytes

    def lane_stats(self) -> dict[str, CallbackStats]:
        return {lane.name: lane.stats() for lane in self.lanes}


@atexit.register
def _close_all() -> None:
    # A hand-written loop that never called `on_train_end`: finish its
    # queued hooks (nothing is lost) before the interpreter goes; then stop
    # the warm workers, which no run uses any more.
    for dispatcher in list(_live_dispatchers):
        dispatcher.close()
    from asynccb._executors import shutdown

    try:
        shutdown()
    except RuntimeError as exc:  # A run still holds it: it exits with us.
        logger.warning("asynccb: at exit, %s", exc)
