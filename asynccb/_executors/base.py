"""The interface every executor implements, and what it runs lanes with."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from asynccb._preemption import Deadline, no_deadline
from asynccb._snapshot import Buffer, allocate_private

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._lane import Lane
    from asynccb._tasks import Task

__all__ = ["Executor", "Runner"]


class Runner(Protocol):
    """Runs one lane's tasks on the executor's side (in this process, or
    through a worker process), one at a time, in order.

    The `async` executor's lanes also split a task into steps, to await a
    coroutine hook in between: they run with the in-process `TaskRunner`
    (the default `Executor.runner`), whose steps `Lane.run_async` uses.

    Attributes:
        capacity: How many snapshot buffers a worker in another process
            may keep mapped (as many as the run's pool may have alive),
            set by the dispatcher before the lane starts; a runner in
            this process maps none and ignores it.
    """

    capacity: int

    def prepare_callback(self) -> None:
        """Readies the callback for the run, on the training thread, so
        that what cannot work fails before training starts."""

    def run(self, task: Task) -> dict[str, Any]:
        """Runs `task`; returns its control effects, or raises its error."""

    def close(self) -> None:
        """Ends the run on the lane's side (drops its shadow)."""


class Executor(abc.ABC):
    """Runs the lanes of offloaded callbacks: one subclass per name.

    What generic code needs before a run is on the class: whether the
    executor awaits `async def` hooks, whether a callback can run there
    (`check`), the `Runner` for a lane, and where snapshot buffers must
    live for its workers to read them. A run makes one instance, which
    starts a consumer per lane and stops them all at the end.
    """

    name: ClassVar[str]
    runs_coroutines: ClassVar[bool] = False
    """Whether `async def` hooks are awaited (other executors refuse them)."""
    crosses_processes: ClassVar[bool] = False
    """Whether its workers read snapshots from another process, so that
    every snapshot of a run must be in memory they can map (`allocate`)."""

    @staticmethod
    def allocate(nbytes: int) -> Buffer:
        """A snapshot buffer of `nbytes` that its workers can read."""
        return allocate_private(nbytes)

    @classmethod
    def check(cls, callback: Any) -> None:
        """Raises if `callback` cannot run on this executor (called when it
        is wrapped, with a message that says what to do instead)."""

    @classmethod
    def runner(cls, callback: Any, deferred_control: bool) -> Runner:
        """The runner of a lane: `callback` is `None` for a lane that
        offloads only saves (its callback stays on the training thread)."""
        from asynccb._tasks import TaskRunner

        return TaskRunner(callback, deferred_control)

    @classmethod
    def shutdown(cls) -> None:
        """Stops what the executor keeps between runs (by default,
        nothing).

        Raises:
            RuntimeError: If a run is using it.
        """

    @classmethod
    def process_ending(cls) -> None:
        """Lets go of what it keeps between runs that would outlive the
        process (by default, nothing): the process ends without running
        its exit handlers (SIGTERM's default action), its runs closed."""

    @abc.abstractmethod
    def start(self, lane: Lane) -> None:
        """Starts a consumer of `lane`'s queue; it runs until the queue is
        closed and empty."""

    @abc.abstractmethod
    def stop(self, deadline: Deadline = no_deadline) -> bool:
        """Waits for every consumer started (their queues closed) to end,
        or until `deadline` (a SIGTERM's: the process is ending, and they
        with it).

        Returns:
            Whether every consumer ended.
        """
