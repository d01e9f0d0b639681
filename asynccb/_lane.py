"""A lane: one offloaded callback's queue, worker-side runner and stats."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from asynccb._backups import route_backups, unroute_backups
from asynccb._channel import Channel, release_all
from asynccb import _preemption
from asynccb._hooks import effective_hooks
from asynccb._roles import (
    StateSpec,
    offloads_saves,
    quiet_hooks,
    setup_state,
    inline_on_every_worker,
    on_every_worker,
    state_planner,
    uses_model,
    waits_for_saves,
)
from asynccb._snapshot import StateLevel
from asynccb._summaries import in_graph_summaries
from asynccb._stats import CallbackStats, SampleMap, Samples
from asynccb._tasks import Task, TaskRunner

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.base import Executor

__all__ = ["Lane"]

logger = logging.getLogger("asynccb")


class Lane:
    """Everything about one offloaded callback, on both sides of its queue.

    The training thread dispatches into `channel`; the executor's consumer
    takes tasks in order and runs each with `run` (or `run_async`), one at a
    time. A failure is recorded here and raised on the training thread by
    the dispatcher.

    Args:
        callback: The wrapped `keras.callbacks.Callback`.
        executor: The executor class (see `asynccb._executors`).
        max_pending: The queue bound.
        on_full: The full-queue policy.
        state: The declared state needs, or `None` to infer them.
        deferred_control: Whether control effects made in the worker are
            applied to the live model later, instead of being an error.
        fast_saves: Whether its saves may take the fast path.
    """

    def __init__(
        self,
        callback: Any,
        *,
        executor: type[Executor],
        max_pending: int,
        on_full: str,
        state: StateSpec | None,
        deferred_control: bool,
        fast_saves: bool = True,
    ):
        self.callback = callback
        self.fast_saves = fast_saves
        self.name = type(callback).__name__
        self.kind = executor
        self.executor = executor.name
        self.policy = on_full
        self.saves_only = offloads_saves(callback)
        # Its inline hooks that must see its saves written first.
        self.waits_for_saves = waits_for_saves(callback)
        # Under a multi-worker strategy: whether it runs on this worker
        # (set by the dispatcher: the chief, or declared for every
        # worker), and which of its hooks run inline on the others.
        self.on_every_worker = on_every_worker(callback)
        self.here = True
        self.inline_everywhere = inline_on_every_worker(callback)
        self.uses_model = uses_model(callback)
        self.hooks = frozenset() if self.saves_only else (
            effective_hooks(callback) - quiet_hooks(callback))
        self.needs: Callable[[str, tuple], StateLevel] = (
            (lambda hook, args: StateLevel.NONE) if self.saves_only
            else state_planner(callback, state)
        )
        # What the shadow holds when the callback gets it.
        self.setup_level = (
            setup_state(callback, state)
            if self.uses_model and not self.saves_only else StateLevel.NONE)
        self.channel = Channel(max_pending)
        # What stays on the training thread of an offloaded TensorBoard.
        self.summaries = in_graph_summaries(callback)
        # In the worker, a callback whose saves only are offloaded is not
        # there at all: only its shadow model is.
        remote_callback = None if self.saves_only else callback
        self.runner = executor.runner(remote_callback, deferred_control)
        self.live_model: Any = None
        # What the callback's `model` is while offloaded (for saves-only
        # callbacks, a stand-in that offloads saves); whether it has it.
        self.offloaded_model: Any = None
        self.attached = False
        self.on_failure: Callable[[], None] = lambda: None
        # Where a save's file puts the state (see `Snapshotter.offer_phases`).
        self.on_file_phases: Callable[..., None] = lambda *phases: None
        self.effects: collections.deque = collections.deque()
        self.error: BaseException | None = None
        self.failed_task = ""
        self.cancelled_tasks: list[str] = []
        self.running: Task | None = None  # The task its worker is on.
        # Counters: written by one side each, read by `stats()`.
        self.dispatched = 0
        self.completed = 0
        self.dropped = 0
        self.cancelled = 0
        self.worker_time = SampleMap()
        self.snapshot_time = Samples()
        self.enqueue_time = Samples()
        self.blocked_time = Samples()
        self.dispatch_time = Samples()
        self.save_paths: collections.Counter[str] = collections.Counter()
        self._save_paths_lock = threading.Lock()

    # Training-thread side.

    def record_drops(self, tasks: list[Task]) -> None:
        """Counts and logs tasks removed by the full-queue policy."""
        if not tasks:
            return
        release_all(tasks)
        first = self.dropped == 0
        self.dropped += len(tasks)
        log = logger.warning if first else logger.info
        log(
            "asynccb: %s queue full (on_full=%r): dropped %s; %d dropped so "
            "far.",
            self.name,
            self.policy,
            ", ".join(task.describe() for task in tasks),
            self.dropped,
        )

    def cancel_pending(self) -> None:
        """Discards every pending task (failure or interrupt)."""
        tasks = self.channel.cancel()
        release_all(tasks)
        self.cancelled += len(tasks)
        self.cancelled_tasks.extend(task.describe() for task in tasks)

    def unfinished(self) -> list[str]:
        """What it accepted and has not done: the running task, then the
        pending ones."""
        running = self.running
        return ([f"{running.describe()} (running)"] if running else []) + [
            task.describe() for task in self.channel.pending()]

    def take_error(self) -> tuple[BaseException, str, list[str]] | None:
        """The recorded failure, cleared so the next run starts clean."""
        if self.error is None:
            return None
        failure = (self.error, self.failed_task, list(self.cancelled_tasks))
        self.error = None
        self.failed_task = ""
        self.cancelled_tasks.clear()
        return failure

    def offload_saves(self) -> None:
        """Gives a saves-only callback its stand-in model, whose saves are
        queued here (and a BackupAndRestore its queued backups)."""
        stand_in = self.offloaded_model
        self.callback._model = stand_in
        route_backups(self.callback, stand_in._submit_save)

    def restore(self) -> None:
        """Gives the user's callback its live model back (end of run).

        During the run its `model` was a shadow (or, for saves, a stand-in);
        after it, as after plain Keras, `callback.model` is the live model.
        """
        if self.live_model is not None:
            self.callback._model = self.live_model
        unroute_backups(self.callback)
        self.attached = False
        self.runner.close()
        if self.summaries is not None:
            self.summaries.close()

    def stats(self) -> CallbackStats:
        # Its locks are the worker's too: a SIGTERM handler must not run
        # the finishing while the training thread holds one.
        with _preemption.busy():
            return CallbackStats(
                name=self.name,
                executor=self.executor,
                dispatched=self.dispatched,
                completed=self.completed,
                dropped=self.dropped,
                cancelled=self.cancelled,
                queue_high_water=self.channel.high_water,
                worker_time=self.worker_time.timings(),
                snapshot=self.snapshot_time.timing(),
                enqueue=self.enqueue_time.timing(),
                blocked=self.blocked_time.timing(),
                dispatch=self.dispatch_time.timing(),
                save_paths=self._save_paths_copy(),
            )

    def _save_paths_copy(self) -> dict[str, int]:
        with self._save_paths_lock:
            return dict(self.save_paths)

    # Worker side.

    def fail(self, what: str, exc: BaseException) -> None:
        """Records a failure of the worker while doing `what`; the pending
        tasks are cancelled and the training thread is woken to raise.
        The first failure is the one reported."""
        if self.error is None:
            self.failed_task = what
            self.error = exc
        self.cancel_pending()
        self.on_failure()

    def _finish(self, task: Task, start: float, effects: dict) -> None:
        self.worker_time.add(task.name, time.perf_counter() - start)
        save_paths = effects.pop("save_paths", ())
        phases = effects.pop("file_phases", None)
        if phases is not None:
            self.on_file_phases(*phases)
        if save_paths:
            with self._save_paths_lock:
                self.save_paths.update(save_paths)
        if effects:
            self.effects.append(effects)
        self.completed += 1

    def _release(self, task: Task) -> None:
        task.release_snapshot()
        self.channel.done()

    def run(self, task: Task) -> None:
        """Runs one task in a worker thread, with bookkeeping."""
        try:
            if self.error is not None:
                self.cancelled += 1  # Failed lanes discard what is left.
                return
            start = time.perf_counter()
            self.running = task
            try:
                effects = self.runner.run(task)
            except BaseException as exc:  # Raised on the training thread.
                self.fail(task.describe(), exc)
            else:
                self._finish(task, start, effects)
        finally:
            self.running = None
            self._release(task)

    async def run_async(
        self, task: Task, run_sync: Callable[..., Awaitable[Any]]
    ) -> None:
        """Runs one task in the event loop: coroutine hooks are awaited,
        plain ones (and snapshot copies) run with `run_sync`, which awaits
        a call made on the lane's thread."""
        try:
            if self.error is not None:
                self.cancelled += 1
                return
            start = time.perf_counter()
            # The async executor's lanes run in this process, with the
            # default runner (see `Runner`).
            runner = self.runner
            assert isinstance(runner, TaskRunner), runner
            self.running = task
            try:
                if runner.is_coroutine_hook(task):
                    before = await run_sync(runner.prepare, task)
                    await runner.invoke(task)
                    effects = runner.effects(task, before)
                else:  # In one call: it may hold a shared shadow.
                    effects = await run_sync(runner.run, task)
            # Not BaseException: the loop's cancellation must propagate;
            # `sys.exit` or Ctrl-C in a hook is the hook's failure.
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                self.fail(task.describe(), exc)
            else:
                self._finish(task, start, effects)
        finally:
            self.running = None
            self._release(task)
