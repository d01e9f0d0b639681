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
from typing import TYPE_CHECKING, Any, Callable, Iterator

from asynccb import _preemption
from asynccb._cluster import is_chief
from asynccb._feedback import (
    apply_deferred_control,
    log_late_failures,
    raise_failure,
)
from asynccb._hooks import copy_logs
from asynccb._kept_memory import interpreter_exiting
from asynccb._lane import Lane
from asynccb._roles import saver_kind
from asynccb._run_watch import RunWatch, keras_run_frame
from asynccb._saving import remove_in_progress
from asynccb._shadow import ModelBlueprint, current_blueprint
from asynccb._snapshot import StateLevel
from asynccb._snapshotter import Snapshotter
from asynccb._stats import CallbackStats
from asynccb._tasks import Task

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.base import Executor
    from asynccb._options import Options

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

    A run that ends early (an exception, Ctrl-C, SIGTERM, interpreter exit)
    still finishes the hooks it accepted, for at most `exit_grace` seconds.

    Args:
        options: The list's (or lone callback's) options: `max_snapshots`,
            `exit_grace`, `handle_sigterm`.
    """

    def __init__(self, options: Options):
        self.lanes: list[Lane] = []
        self.model: Any = None
        self.chief = True  # Of a cluster: see `asynccb._cluster`.
        self.grace = options.exit_grace
        self._handle_sigterm = options.handle_sigterm
        self.snapshotter = Snapshotter(options.max_snapshots)
        self.pool = self.snapshotter.pool
        self._depth = 0
        self._executors: dict[str, Executor] = {}
        self._running = False
        self._lifecycle = threading.RLock()
        self._watch: RunWatch | None = None
        self._too_late: list[str] = []  # Hooks SIGTERM's grace refused.
        _live_dispatchers.add(self)

    # Configuration.

    def add_lane(self, lane: Lane) -> None:
        names = {existing.name for existing in self.lanes}
        base, number = lane.name, 2
        while lane.name in names:
            lane.name = f"{base}#{number}"
            number += 1
        lane.on_failure = self.wake
        lane.on_file_phases = self.snapshotter.offer_phases
        lane.here = self.chief or lane.on_every_worker
        with self._lifecycle:
            self.lanes.append(lane)
            if self._running and lane.here:  # A list already at work.
                self._start_lane(lane)

    def set_model(self, model: Any) -> None:
        """Takes the model of the next run (Keras calls this before its
        begin hook); a run before it whose `fit` raised is closed first,
        so that nothing of the new run is queued to that run's workers
        while its watch stops them."""
        _close_abandoned_runs()
        if model is not self.model:
            self.model = model
            self.snapshotter.forget_layouts(
                model, tuple(saver_kind(lane.callback) for lane in self.lanes))
            self.chief = is_chief(model)
            for lane in self.lanes:
                lane.here = self.chief or lane.on_every_worker

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
        """Enters a run (`on_*_begin`); the outermost starts the workers.

        A run before it whose Keras `fit` raised past its end hook is
        closed first, if its watch has not yet: the new run (a resumed
        fit restoring from a backup) comes after that run's saves.
        """
        _close_abandoned_runs()
        with _preemption.busy(), self._lifecycle:
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
        with _preemption.busy(), self._lifecycle:
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
        with _preemption.busy(), self._lifecycle:
            if self._running:
                return
            self._running = True
            if self._handle_sigterm:
                _preemption.run_started(self)
            # Snapshots hold tensors, unless a lane's workers are in
            # another process (see `_start_lane`) or saves write from them.
            self.pool.use(self.snapshotter.allocate_in_process())
            for lane in self.lanes:
                if lane.here:
                    self._start_lane(lane)

    def _attach(self, lane: Lane) -> None:
        # A list reused for another run: Keras does not call `set_model`
        # again, but the callbacks got their live model back at the end of
        # the last run; give them their offloaded model again, silently.
        lane.attached = True
        if not lane.here:
            return  # The chief's work: nothing to give back here.
        if lane.saves_only:
            lane.offload_saves()
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

    def close(self, grace: float | None = None, exiting: bool = False,
              reason: str = "an exception") -> None:
        """Finishes the accepted hooks and stops the workers.

        Afterwards no worker of this dispatcher runs, every snapshot buffer
        is freed, and each callback has its live model back.

        Args:
            grace: `None` at a run's normal end: every queued hook runs.
                For a run ending early, the most seconds to wait; then the
                hooks not started are discarded and listed (see
                `give_up`), and the running ones waited for.
            exiting: The interpreter is exiting: past the grace, the
                running hooks are not waited for either.
            reason: What ended the run early, for the message listing
                what was not done (when not exiting).
        """
        with _preemption.busy(), self._lifecycle:
            if not self._running:
                return
            self.snapshotter.end_window()
            stopping = True
            try:
                left = self.finish(grace)
                if left and _preemption.deadline(self) is not None:
                    # SIGTERM: its handler gives up on these and ends the
                    # process, without waiting for the running hooks.
                    stopping = False
                    return
                # At a normal end `left` is only a failed lane's last
                # task, on its way out: the workers' stop waits for it.
                if left and grace is not None:
                    why = "interpreter exit" if exiting else reason
                    self.give_up(left, why, ending=exiting)
                    if exiting:
                        stopping = False
                        return
                stopping = self._stop_workers()
            except BaseException:
                # Interrupted while waiting (Ctrl-C again): discard what
                # has not started, wait only for what is running.
                self.give_up(self.unfinished(), "a second interrupt")
                stopping = self._stop_workers()
                raise
            finally:
                if stopping:
                    self._stopped()

    def close_with(self, owner: object) -> weakref.finalize:
        """Closes a run left open (no `on_*_end`) when `owner`, the list
        or callback, is collected; at interpreter exit `_close_all` does,
        as an exit. Returns the finalizer.

        The finalizer holds this dispatcher until `owner` is collected:
        nothing the dispatcher holds (its lanes, their callbacks) may refer
        back to `owner`.
        """
        finalizer = weakref.finalize(
            owner, self.close, self.grace,
            reason="its callbacks being dropped without `on_train_end`")
        finalizer.atexit = False
        return finalizer

    def _stopped(self) -> None:
        for lane in self.lanes:
            lane.restore()
        self.snapshotter.close()  # Its layouts stay, for the next.
        self._depth = 0
        self._running = False
        _preemption.run_ended(self)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _stop_workers(self) -> bool:
        """Closes the queues and waits for the workers to end, or for a
        SIGTERM's deadline. Returns whether they all ended."""
        for lane in self.lanes:
            lane.channel.close()
        for name, executor in list(self._executors.items()):
            if not executor.stop(self._sigterm_deadline):
                return False  # Past the deadline: the process ends now.
            del self._executors[name]
        return True

    def finish(self, grace: float | None = None) -> list[str]:
        """Waits until every accepted hook has run, for at most `grace`
        seconds (`None`: no bound) and never past a SIGTERM's grace.

        Returns:
            What is not done when the time runs out (empty if all is).
        """
        limit = None if grace is None else time.monotonic() + grace

        def deadline() -> float | None:
            preempted = _preemption.deadline(self)
            if preempted is None or limit is None:
                return limit if preempted is None else preempted
            return min(limit, preempted)

        with _preemption.busy():
            for lane in self.lanes:  # Past the deadline, each returns at once.
                lane.channel.join(interrupted=_failed(lane), deadline=deadline)
        return self.unfinished()

    def finish_lane(self, lane: Lane) -> None:
        """Waits until `lane` has done what it accepted (a saves-only
        callback's inline hook that reads or removes its files).

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        with _preemption.busy():
            lane.channel.join(interrupted=_failed(lane),
                              deadline=self._sigterm_deadline)
        self.check()

    def unfinished(self) -> list[str]:
        """What the lanes accepted and have not done, each named; then the
        hooks that came too late to be accepted (see `_submit`)."""
        return [f"{lane.name}: {task}" for lane in self.lanes
                for task in lane.unfinished()] + self._too_late

    def give_up(self, left: list[str], why: str, ending: bool = False
                ) -> None:
        """Discards the hooks not started and lists `left` on stderr (a
        run ended by `why` whose grace ran out).

        Args:
            left: What is not done, from `finish`.
            why: What ended the run, for the message.
            ending: The process is ending (its caller then removes the
                temporary files of the saves still being written, once
                every run has given up: see `remove_in_progress`).
        """
        for lane in self.lanes:
            lane.cancel_pending()
        if ending:
            # The buffers no running hook holds: their shared memory goes
            # now, not when the resource tracker finds it left over.
            self.snapshotter.close(self._sigterm_deadline)
        if left:
            logger.error(
                "asynccb: the run ended by %s; after %.1f s (exit_grace) "
                "this was not done: %s. The files already written are "
                "intact.", why, self.grace, "; ".join(left))

    def wake(self) -> None:
        """Wakes the training thread's waits (for room in a queue, for a
        snapshot buffer), so that they look again: at a failed lane (which
        calls this) or at their deadline (a SIGTERM arrived)."""
        for lane in self.lanes:
            lane.channel.interrupt()
        self.pool.interrupt()

    def _sigterm_deadline(self) -> float | None:
        return _preemption.deadline(self)

    def _check_waiting(self) -> float | None:
        """Before the training thread waits in `_submit`: raises a lane's
        failure; returns when the wait must end (a SIGTERM's deadline)."""
        self.check()
        return self._sigterm_deadline()

    def _watch_run(self) -> None:
        frame = keras_run_frame()
        if frame is not None:
            self._watch = RunWatch(self, frame)

    def close_if_abandoned(self) -> None:
        """Closes the run now if its watch would: Keras' run left the
        stack without its end hook."""
        watch = self._watch
        if watch is not None and not watch.run_alive():
            self.close(grace=self.grace)
            log_late_failures(self.lanes)  # Not this new run's to raise.

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
            self.close(grace=self.grace)
        finally:
            self._lifecycle.release()
        log_late_failures(self.lanes)
        return True

    def wait(self) -> None:
        """Blocks until every call queued so far has run.

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        self.finish()
        self.check()

    # Errors and deferred control.

    def check(self) -> None:
        """Raises a failure, applies deferred control: at every hook."""
        for lane in self.lanes:
            if lane.error is not None:
                with _preemption.busy():
                    self.close(grace=self.grace)
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
        except BaseException:
            self.close(grace=self.grace)
            raise
        finally:
            self.end_dispatch()

    def end_dispatch(self) -> None:
        """Ends the sharing window of the current dispatch's snapshot."""
        with _preemption.busy():
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
        task = Task(kind, name, args, copy_logs(logs), kwargs or {},
                    fast=lane.fast_saves)
        with _preemption.busy():
            try:
                self._submit(lane, task, level)
            except _preemption.TooLate:
                # SIGTERM's grace ran out while it waited to be queued:
                # not accepted; listed as the process ends.
                self._too_late.append(
                    f"{lane.name}: {task.describe()} (not queued)")

    def _submit(self, lane: Lane, task: Task, level: StateLevel) -> None:
        kind = task.kind
        start = time.perf_counter()
        blocked = 0.0
        if kind in ("hook", "save"):  # Setup is not bounded: see above.
            blocked, dropped = lane.channel.make_room(
                lane.policy, interrupted=_failed(lane),
                deadline=self._sigterm_deadline)
            lane.record_drops(dropped)
            if lane.error is not None:
                self.check()
            if not lane.channel.has_room():  # A SIGTERM's deadline passed.
                raise _preemption.TooLate()
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
        task.model = blueprint
        snapshot_s = 0.0
        if with_snapshot:
            task.snapshot, snapshot_s, waited = self.snapshotter.take(
                self.model, level, lane, self._check_waiting)
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
        if any(lane.saves_only and lane.here for lane in self.lanes):
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


def _close_abandoned_runs() -> None:
    """Closes, on the training thread, every run whose Keras `fit` raised
    past its end hook and whose watch has not closed it yet."""
    with _preemption.busy():
        for dispatcher in list(_live_dispatchers):
            dispatcher.close_if_abandoned()


def _failed(lane: Lane) -> Callable[[], bool]:
    """Whether `lane` has failed (a wait on its queue then ends)."""
    return lambda: lane.error is not None


@atexit.register
def _close_all() -> None:
    # A hand-written loop that never called `on_train_end`: finish its
    # queued hooks (nothing is lost) before the interpreter goes; then stop
    # the warm workers, which no run uses any more. Runs closing now start
    # no idle countdown (see `interpreter_exiting`).
    interpreter_exiting()
    for dispatcher in list(_live_dispatchers):
        dispatcher.close(grace=dispatcher.grace, exiting=True)
    # Only now: a run closed later may still have been writing its saves.
    remove_in_progress()
    from asynccb._executors import shutdown

    try:
        shutdown()
    except RuntimeError as exc:  # A run still holds it: it exits with us.
        logger.warning("asynccb: at exit, %s", exc)
