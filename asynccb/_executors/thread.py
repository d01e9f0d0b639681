"""The `thread` executor: one worker thread per offloaded callback."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from asynccb._channel import CLOSED
from asynccb._executors.base import Executor
from asynccb._executors.placement import pin_this_thread
from asynccb._preemption import Deadline, join_until, no_deadline

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._lane import Lane

__all__ = ["ThreadExecutor"]


def _consume(lane: "Lane") -> None:
    while True:
        task = lane.channel.get()
        if task is CLOSED:
            return
        lane.run(task)


class ThreadExecutor(Executor):
    """Runs each lane's tasks, in order, on a thread of its own.

    The threads are daemons so that a hook stuck forever cannot keep the
    interpreter alive, but they are never left behind: `stop` joins them,
    and the dispatcher calls it at the end of every run and at exit.
    """

    name = "thread"

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    @staticmethod
    def serve(lane: "Lane") -> None:
        """What the lane's thread runs: take tasks, run them, in order."""
        pin_this_thread()
        _consume(lane)

    def start(self, lane: "Lane") -> None:
        thread = threading.Thread(
            target=self.serve, args=(lane,), name=f"asynccb-{lane.name}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def stop(self, deadline: Deadline = no_deadline) -> bool:
        """Waits for the consumers, whose channels must be closed, to end
        (see `Executor.stop`)."""
        while self._threads:
            if not join_until(self._threads[-1], deadline):
                return False
            self._threads.pop()
        return True
