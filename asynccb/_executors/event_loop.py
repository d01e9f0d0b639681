"""The `async` executor: offloaded callbacks as tasks of an anyio event loop.

The loop runs in a background thread behind a blocking portal, so it works
the same whether or not the training thread has an event loop of its own
(a notebook, an async test). A callback may define `async def` hooks, which
are awaited in the loop; its plain hooks run on a thread of the lane's own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from concurrent.futures import Future
from typing import Any, Callable

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from asynccb._channel import CLOSED
from asynccb._executors.base import Executor
from asynccb._executors.placement import pin_this_thread
from asynccb._preemption import Deadline, no_deadline, passed, wait_slice
from asynccb._lane import Lane

__all__ = ["AsyncExecutor"]


class _LaneThread:
    """Runs one lane's synchronous calls on one thread of its own, awaited
    from the event loop.

    A callback may keep thread-local state from one hook to the next
    (TensorBoard makes its writer TensorFlow's default in `on_train_begin`
    and leaves it in a later hook); anyio's worker threads would run
    successive hooks on whichever thread is idle.

    Args:
        lane: The lane whose calls it runs (names the thread).
        portal: The portal of the loop that awaits them.
    """

    def __init__(self, lane: Lane, portal: BlockingPortal):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"asynccb-{lane.name}",
            initializer=pin_this_thread)
        self._portal = portal

    async def run_sync(self, function: Callable[..., Any], *args: Any) -> Any:
        done = anyio.Event()

        def work() -> Any:
            try:
                return function(*args)
            finally:  # On the lane's thread: hop to the loop.
                self._portal.start_task_soon(done.set)

        future = self._pool.submit(work)
        await done.wait()
        return future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


async def _consume(lane: Lane, portal: BlockingPortal) -> None:
    pin_this_thread()  # The loop's thread.
    thread = _LaneThread(lane, portal)
    try:
        while True:
            wakeup = anyio.Event()
            # Called on the training thread by the next put: hop to the loop.
            task = lane.channel.get_or_arm(
                lambda: portal.start_task_soon(wakeup.set)
            )
            if task is None:
                await wakeup.wait()
                continue
            if task is CLOSED:
                return
            await lane.run_async(task, thread.run_sync)
    finally:
        thread.close()


class AsyncExecutor(Executor):
    """Runs each lane as a consumer task in one shared event loop."""

    name = "async"
    runs_coroutines = True

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None
        self._portal: BlockingPortal | None = None
        self._consumers: list[Future[Any]] = []

    def start(self, lane: Lane) -> None:
        if self._portal is None:
            self._stack = contextlib.ExitStack()
            self._portal = self._stack.enter_context(start_blocking_portal())
        self._consumers.append(
            self._portal.start_task_soon(_consume, lane, self._portal))

    def stop(self, deadline: Deadline = no_deadline) -> bool:
        """Waits for the consumers (channels closed) and stops the loop
        (see `Executor.stop`)."""
        try:
            while self._consumers:
                due = deadline()
                if passed(due):
                    return False  # The loop's thread ends with the process.
                try:
                    self._consumers[-1].result(wait_slice(due))
                except concurrent.futures.TimeoutError:
                    continue
                self._consumers.pop()
        except BaseException:
            self._close_loop()
            raise
        self._close_loop()
        return True

    def _close_loop(self) -> None:
        if self._stack is not None:
            stack, self._stack, self._portal = self._stack, None, None
            stack.close()
