"""An ordered, bounded queue from the training thread to one consumer."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Iterable

from asynccb._preemption import Deadline, no_deadline, passed, wait_slice

__all__ = ["Channel", "CLOSED", "POLICIES"]

POLICIES = ("block", "drop_oldest", "latest")

CLOSED = object()
"""Returned by `Channel.get` once the channel is closed and empty."""


class Channel:
    """A FIFO of at most `capacity` pending items, with a full-queue policy.

    The training thread puts; one consumer (a worker thread, or an async
    task that arms a waker) takes items in order and marks each done.

    Args:
        capacity: The maximum number of pending (not yet taken) items.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.high_water = 0
        self._items: collections.deque = collections.deque()
        self._unfinished = 0
        self._closed = False
        self._waker: Callable[[], object] | None = None
        self._producer_blocked = False
        # Reentrant: a SIGTERM handler on the training thread may wake
        # the waits (`interrupt`) while that thread is inside a method.
        # (`Condition()` makes an RLock too; said here as it matters.)
        self._cond = threading.Condition(threading.RLock())

    # Producer side (training thread).

    def make_room(
        self,
        policy: str,
        interrupted: Callable[[], bool],
        deadline: Deadline = no_deadline,
    ) -> tuple[float, list[Any]]:
        """Ensures one more item fits, as `policy` says.

        Args:
            policy: One of `POLICIES`. `block` waits; `drop_oldest` removes
                the oldest droppable pending item; `latest` removes the
                oldest droppable one that holds a snapshot, or the oldest
                droppable one if none does. With nothing droppable pending,
                every policy waits.
            interrupted: Checked while blocked; when it returns true the wait
                ends early (a worker failed and the caller will raise).
            deadline: The `time.monotonic()` time the wait ends at, asked
                again at each wake (`None`: no bound); then there may be
                no room (see `has_room`).

        Returns:
            The seconds spent blocked, and the items dropped.
        """
        dropped: list[Any] = []
        blocked = 0.0
        with self._cond:
            while len(self._items) >= self.capacity:
                victim = None if policy == "block" else self._victim(policy)
                if victim is not None:
                    self._items.remove(victim)
                    self._unfinished -= 1
                    dropped.append(victim)
                else:
                    due = deadline()
                    if interrupted() or passed(due):
                        break
                    start = time.perf_counter()
                    self._wait_blocked(due)
                    blocked += time.perf_counter() - start
        return blocked, dropped

    def _wait_blocked(self, due: float | None) -> None:
        """One wait of the producer, lock held: until a wake, `due` or a
        slice (see `wait_slice`), seen by `wait_producer_blocked`."""
        self._producer_blocked = True
        self._cond.notify_all()
        try:
            self._cond.wait(wait_slice(due))
        finally:
            self._producer_blocked = False

    def _victim(self, policy: str) -> Any:
        droppable = [item for item in self._items
                     if getattr(item, "droppable", True)]
        if policy == "latest":
            holding = [item for item in droppable
                       if getattr(item, "snapshot", None) is not None]
            droppable = holding or droppable
        return droppable[0] if droppable else None

    def drop_oldest_holding_snapshot(self) -> Any:
        """Removes and returns the oldest droppable pending item that holds
        a snapshot, or `None`."""
        with self._cond:
            for item in self._items:
                if getattr(item, "droppable", True) and (
                    getattr(item, "snapshot", None) is not None
                ):
                    self._items.remove(item)
                    self._unfinished -= 1
                    self._cond.notify_all()
                    return item
        return None

    def has_room(self) -> bool:
        """Whether one more item fits in the bound."""
        with self._cond:
            return len(self._items) < self.capacity

    def put(self, item: Any) -> None:
        """Appends `item`; call `make_room` first to respect the bound."""
        with self._cond:
            if self._closed:
                raise RuntimeError("put() on a closed asynccb channel")
            self._items.append(item)
            self._unfinished += 1
            self.high_water = max(self.high_water, len(self._items))
            self._cond.notify_all()
            waker, self._waker = self._waker, None
        if waker is not None:
            waker()

    def open(self) -> None:
        """Accepts puts again, for a new consumer (the next run)."""
        with self._cond:
            self._closed = False

    def close(self) -> None:
        """No more puts: the consumer gets `CLOSED` after the last item."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            waker, self._waker = self._waker, None
        if waker is not None:
            waker()

    def cancel(self) -> list[Any]:
        """Removes and returns every pending item."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._unfinished -= len(items)
            self._cond.notify_all()
        return items

    def join(
        self,
        interrupted: Callable[[], bool] = lambda: False,
        deadline: Deadline = no_deadline,
    ) -> bool:
        """Waits until every item put so far is done, or `interrupted`, or
        the `time.monotonic()` time `deadline` returns (asked again at each
        wake: it may appear during the wait).

        Returns:
            Whether every item is done.
        """
        with self._cond:
            while self._unfinished > 0 and not interrupted():
                due = deadline()
                if passed(due):
                    break
                self._wait_blocked(due)
            return self._unfinished == 0

    def pending(self) -> list[Any]:
        """The items not yet taken, oldest first."""
        with self._cond:
            return list(self._items)

    def wait_producer_blocked(self, timeout: float | None = None) -> bool:
        """Waits until the producer is blocked: on a full queue, or
        waiting for the items put to be done (`join`).

        For observing backpressure (tests, monitoring) without polling.

        Returns:
            Whether it is blocked (`False` after `timeout` seconds).
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._producer_blocked, timeout)

    def interrupt(self) -> None:
        """Wakes the producer's waits so they can check `interrupted`."""
        with self._cond:
            self._cond.notify_all()

    # Consumer side.

    def get(self) -> Any:
        """The next item, blocking; `CLOSED` once closed and drained."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return CLOSED
                self._cond.wait()
            return self._items.popleft()

    def get_or_arm(self, waker: Callable[[], object]) -> Any:
        """The next item, or `None` after arming `waker` for the next put.

        For consumers that cannot block a thread (async tasks): `waker` is
        called, from the producer's thread, on the next `put` or `close`
        (what it returns is ignored).
        """
        with self._cond:
            if self._items:
                return self._items.popleft()
            if self._closed:
                return CLOSED
            self._waker = waker
            return None

    def done(self, count: int = 1) -> None:
        """Marks taken items finished (for `join`)."""
        with self._cond:
            self._unfinished -= count
            self._cond.notify_all()


def release_all(items: Iterable[Any]) -> None:
    """Releases the snapshots held by `items` (dropped or cancelled)."""
    for item in items:
        snapshot = getattr(item, "snapshot", None)
        if snapshot is not None:
            snapshot.release()
