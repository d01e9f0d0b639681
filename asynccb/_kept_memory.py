"""Snapshot memory whose run ended, kept warm for the next run's buffers.

A new snapshot buffer costs its size in fresh pages at every `fit`. On a
VM whose free memory goes back to its host (as on the machine the
benchmarks ran on), fresh pages cost many times their copy: seconds of
CPU per GiB of state, charged to whichever thread touches them first. A
buffer kept from an ended run is still paged in, so the next run of a
model that size pays none of it. What is kept is bounded (a few buffers)
and given back: after an idle timeout without a run, at
`asynccb.shutdown()` and at interpreter exit.
"""

from __future__ import annotations

import atexit
import threading
from typing import Callable, Generic, TypeVar

__all__ = ["IDLE_TIMEOUT_S", "KeptMemory"]

IDLE_TIMEOUT_S = 600.0
"""How long worker processes stay warm, and snapshot memory is kept,
without a run, by default: long enough for a notebook's next cell or a
sweep's next trial, short enough that a forgotten session gives its
memory back."""

T = TypeVar("T")


class KeptMemory(Generic[T]):
    """Pieces of memory kept between runs, at most `limit` of them.

    Args:
        size: The size in bytes of a piece.
        drop: Gives a piece back (unmaps, unlinks); called outside the lock.
        limit: How many pieces are kept; the least recently kept go first.
        idle_name: The name of the idle countdown's thread; `None` for
            memory that something else frees when idle (the process
            executor's segments go with its warm workers).

    Attributes:
        idle_timeout: Seconds after the last piece was kept until all are
            given back, or `None` for never (see `set_idle_timeout`).
    """

    def __init__(self, size: Callable[[T], int], drop: Callable[[T], None],
                 limit: int, idle_name: str | None = None):
        self._size = size
        self._drop = drop
        self._limit = limit
        self._idle_name = idle_name
        self.idle_timeout: float | None = IDLE_TIMEOUT_S
        self._lock = threading.Lock()
        self._pieces: list[T] = []
        self._idle: threading.Timer | None = None
        self._closed = False
        # At exit, after this, runs closing give their memory back as they
        # go (the dispatcher's exit hook may run before or after it).
        atexit.register(self.free, closing=True)

    def take(self, nbytes: int) -> T | None:
        """The smallest kept piece of `nbytes` up to twice that, if any
        (a much larger one stays for the model it was made for)."""
        with self._lock:
            fitting = [i for i, p in enumerate(self._pieces)
                       if nbytes <= self._size(p) <= 2 * nbytes]
            if not fitting:
                return None
            # By position: pieces may not compare (NumPy arrays).
            index = min(fitting, key=lambda i: self._size(self._pieces[i]))
            return self._pieces.pop(index)

    def keep(self, piece: T) -> None:
        """Keeps `piece` for a later run, giving back the least recently
        kept beyond the limit (all of them once closed), and starts the
        idle countdown again."""
        with self._lock:
            self._pieces.append(piece)
            unwanted = (self._pieces if self._closed else
                        self._pieces[:-self._limit])
            self._pieces = self._pieces[len(unwanted):]
            self._cancel_idle()
            if self._pieces:
                self._arm_idle()
        for old in unwanted:
            self._drop(old)

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Sets the idle timeout (`asynccb.configure_workers`) and starts
        the countdown again with it."""
        with self._lock:
            self.idle_timeout = seconds
            self._cancel_idle()
            if self._pieces:
                self._arm_idle()

    def pieces(self) -> list[T]:
        with self._lock:
            return list(self._pieces)

    def free(self, closing: bool = False) -> None:
        """Gives back every kept piece; `closing`, also those kept later
        (interpreter exit: a run closing after this frees its own)."""
        with self._lock:
            pieces, self._pieces = self._pieces, []
            self._closed = self._closed or closing
            self._cancel_idle()
        for piece in pieces:
            self._drop(piece)

    def _arm_idle(self) -> None:
        if self._idle_name is None or self.idle_timeout is None:
            return
        idle = threading.Timer(self.idle_timeout, self._expire)
        idle.args = (idle,)
        idle.name = self._idle_name
        idle.daemon = True
        self._idle = idle
        idle.start()

    def _cancel_idle(self) -> None:
        # Not joined: a countdown that fired waits for the lock held here,
        # then sees it is no longer the current one.
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.cancel()

    def _expire(self, timer: threading.Timer) -> None:
        with self._lock:
            if timer is not self._idle:
                return  # Cancelled: a run took a piece, or a free.
            pieces, self._pieces, self._idle = self._pieces, [], None
        for piece in pieces:
            self._drop(piece)
