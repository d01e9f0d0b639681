"""What runs keep for the next run, and the countdowns that give it back.

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

import threading
from typing import Callable, Generic, TypeVar

__all__ = ["IDLE_TIMEOUT_S", "KEPT", "Countdown", "KeptMemory",
           "interpreter_exiting"]

IDLE_TIMEOUT_S = 600.0
"""How long worker processes stay warm, and snapshot memory is kept,
without a run, by default: long enough for a notebook's next cell or a
sweep's next trial, short enough that a forgotten session gives its
memory back."""

KEPT = 4
"""How many snapshot buffers are kept: twice a run's, by default."""

T = TypeVar("T")

_exiting = False


def interpreter_exiting() -> None:
    """Starts no countdown from now on: the interpreter is exiting (the
    first thing asynccb's exit hook does). What is kept goes with the
    process, and from Python 3.12 a thread started in an exit hook raises,
    which would cut short the closing of the runs that keep memory."""
    global _exiting
    _exiting = True


class Countdown:
    """One idle countdown at a time, for an owner that starts, cancels and
    expires it under a lock of its own.

    Args:
        name: The name of the countdown's thread.
        expire: Called with the timer when it runs out; it takes the
            owner's lock and asks `expired` first: a countdown cancelled
            after it ran out still calls it.
    """

    def __init__(self, name: str,
                 expire: Callable[[threading.Timer], None]):
        self.name = name
        self._expire = expire
        self.timer: threading.Timer | None = None

    def start(self, seconds: float) -> None:
        """Starts counting `seconds` (the current one cancelled), unless
        the interpreter is exiting."""
        self.cancel()
        if _exiting:
            return
        timer = threading.Timer(seconds, self._expire)
        timer.args = (timer,)
        timer.name = self.name
        timer.daemon = True
        self.timer = timer
        timer.start()

    def cancel(self) -> None:
        # Not joined: a countdown that ran out waits for the owner's lock,
        # held here, then sees it is no longer the current one.
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    def expired(self, timer: threading.Timer) -> bool:
        """Whether `timer` is the current countdown (then no longer)."""
        if timer is not self.timer:
            return False  # Cancelled: a run came, or it was freed.
        self.timer = None
        return True


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
        idle_timeout: Seconds after a run gave back its last piece until
            all are given back, or `None` for never (`set_idle_timeout`).
    """

    def __init__(self, size: Callable[[T], int], drop: Callable[[T], None],
                 limit: int = KEPT, idle_name: str | None = None):
        self._size = size
        self._drop = drop
        self._limit = limit
        self.idle_timeout: float | None = IDLE_TIMEOUT_S
        self._lock = threading.Lock()
        self._pieces: list[T] = []
        self._idle = (Countdown(idle_name, self._expire)
                      if idle_name is not None else None)
        self._closed = False

    def take(self, nbytes: int) -> T | None:
        """The smallest kept piece of `nbytes` up to twice that, if any
        (a much larger one stays for the model it was made for). A run
        is using the memory: the idle countdown stops until it is kept
        again."""
        with self._lock:
            fitting = [i for i, p in enumerate(self._pieces)
                       if nbytes <= self._size(p) <= 2 * nbytes]
            if not fitting:
                return None
            self._cancel_idle()
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
            self._arm_idle()
        for old in unwanted:
            self._drop(old)

    def set_idle_timeout(self, seconds: float | None) -> None:
        """Sets the idle timeout (`asynccb.configure_workers`) and starts
        the countdown again with it."""
        with self._lock:
            self.idle_timeout = seconds
            self._cancel_idle()
            self._arm_idle()

    def pieces(self) -> list[T]:
        """The pieces kept now, least recently kept first."""
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
        """Starts the idle countdown (under the lock), unless nothing is
        kept, there is no timeout, or something else frees it."""
        if self._idle and self._pieces and self.idle_timeout is not None:
            self._idle.start(self.idle_timeout)

    def _cancel_idle(self) -> None:
        if self._idle:
            self._idle.cancel()

    def _expire(self, timer: threading.Timer) -> None:
        with self._lock:
            if not (self._idle and self._idle.expired(timer)):
                return
            pieces, self._pieces = self._pieces, []
        for piece in pieces:
            self._drop(piece)
