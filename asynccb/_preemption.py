"""SIGTERM during a run: finish what was accepted, then end as SIGTERM would.

A scheduler preempting a job sends SIGTERM, waits a grace period, then
sends SIGKILL. Plain Keras' checkpoints are on disk when their hook
returns; asynccb's are only queued, so while a run is active asynccb
handles SIGTERM: it finishes every hook it had accepted (each run's
`exit_grace` from the signal's arrival), then lets the signal take its
normal course: the handler that was there before is called, or, if there
was none, the process ends with the status SIGTERM gives.

The handler runs on the main thread, between two of its bytecodes. If that
thread is inside asynccb's own code (queueing a hook, taking a snapshot,
starting or ending a run: `busy()`), it may hold a lock the finishing
needs, so the handler only records the signal and wakes asynccb's waits;
the outermost `busy()` block finishes the work when it ends. Anywhere else
(a training step, the user's code), the handler finishes the work itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from asynccb import _executors
from asynccb._saving import remove_in_progress

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._dispatcher import Dispatcher

__all__ = ["TooLate", "busy", "deadline", "run_ended", "run_started",
           "passed", "wait_slice", "join_until", "Deadline", "no_deadline"]

logger = logging.getLogger("asynccb")

# Runs in progress on the main thread that asked for SIGTERM handling.
_runs: list["Dispatcher"] = []
# The SIGTERM handler before ours, while ours is installed.
_previous: Any = None
_installed = False
# How deep the main thread is in asynccb's own code.
_depth = 0
# When a SIGTERM arrived and is being handled (`time.monotonic()`).
_arrived: float | None = None

# The training thread's waits read the deadline, then wait. A SIGTERM
# landing between the two finds no waiter to wake, so they wait in slices
# this long and read it again.
_WAIT_SLICE = 0.25


class TooLate(Exception):
    """A hook still waiting to be queued (for room in its queue, or for a
    snapshot buffer) when a SIGTERM's grace ran out: it is not accepted,
    and is listed with what was not done."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run_started(dispatcher: "Dispatcher") -> None:
    """Handles SIGTERM for `dispatcher`'s run, which is starting.

    Only from the main thread (the only one Python lets install a
    handler), and not if SIGTERM is ignored (the user chose that) or has a
    handler Python did not install (it could not be chained).
    """
    global _previous, _installed
    if not _on_main_thread():
        return
    if not _installed:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous is signal.SIG_IGN:
            return
        _previous = previous
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True
    if dispatcher not in _runs:
        _runs.append(dispatcher)


def run_ended(dispatcher: "Dispatcher") -> None:
    """Stops handling SIGTERM for `dispatcher`; gives the signal its
    previous handler back when no run needs ours (if called on the main
    thread; otherwise the next run's start or end on it does)."""
    global _installed
    if dispatcher in _runs:
        _runs.remove(dispatcher)
    if _installed and not _runs and _arrived is None and _on_main_thread():
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous)
        _installed = False


def deadline(dispatcher: "Dispatcher") -> float | None:
    """When the work of `dispatcher`'s run must be finished, if a SIGTERM
    arrived that ends the process (`time.monotonic()` time); `None` if
    none did, the run is not one SIGTERM is handled for, or the user's own
    handler decides what comes next (the run then goes on)."""
    arrived = _arrived
    if arrived is None or dispatcher not in _runs or callable(_previous):
        return None
    return arrived + dispatcher.grace


Deadline = Callable[[], "float | None"]
"""When a wait must end (`time.monotonic()`), asked again at each wake: a
SIGTERM may set one during the wait; `None`: no bound yet."""


def no_deadline() -> float | None:
    """The `Deadline` of a wait with no bound."""
    return None


def passed(due: float | None) -> bool:
    """Whether the deadline `due` (`None`: none) is past."""
    return due is not None and time.monotonic() >= due


def wait_slice(due: float | None) -> float:
    """How long a wait that ends at `due` (`time.monotonic()`; `None`:
    unbounded) waits before reading its deadline again: at most a slice,
    as a SIGTERM may set one meanwhile; `0` once `due` is past."""
    if due is None:
        return _WAIT_SLICE
    return max(0.0, min(_WAIT_SLICE, due - time.monotonic()))


def join_until(thread: threading.Thread, deadline: "Deadline") -> bool:
    """Joins `thread` in slices until it ends (`True`) or `deadline`, read
    again at each slice, passes (`False`: the thread is left running)."""
    while thread.is_alive():
        due = deadline()
        if passed(due):
            return False
        thread.join(wait_slice(due))
    return True


@contextlib.contextmanager
def busy() -> Iterator[None]:
    """Marks asynccb's own code on the main thread: a SIGTERM arriving
    inside waits for the outermost block to end (other threads pass)."""
    global _depth
    if not _on_main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _arrived is not None:
            _finish_and_deliver(signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    global _arrived
    if _arrived is not None:
        return  # Already finishing; the first signal's grace holds.
    _arrived = time.monotonic()
    if _depth:
        for dispatcher in list(_runs):
            dispatcher.wake()  # Its waits then see the deadline.
        return
    _finish_and_deliver(signum, frame)


def _finish_and_deliver(signum: int, frame: Any = None) -> None:
    global _arrived, _depth
    # The finishing is asynccb's own code too: its `busy()` blocks do not
    # start it again.
    _depth += 1
    try:
        left = {id(run): run.finish() for run in list(_runs)}
        if callable(_previous):
            # The user's handler decides what comes next; the runs go on.
            _arrived = None
            _previous(signum, frame)
            return
        for run in list(_runs):
            if left[id(run)]:
                run.give_up(left[id(run)], "SIGTERM", ending=True)
            else:
                run.close()
        # Once all gave up: the saves still being written in this process,
        # and what executors keep between runs (exit handlers do not run).
        remove_in_progress()
        _executors.process_ending()
    finally:
        _depth -= 1
    _end_as_sigterm(signum)


def _end_as_sigterm(signum: int) -> None:
    """Ends the process as SIGTERM would have without asynccb (worker
    processes see their lifeline close and exit too)."""
    logging.shutdown()  # Flush what was logged, as the interpreter would.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    # Still here: the signal's default action does not apply (PID 1 of a
    # container ignores it). End as a shell reports a SIGTERM'd process.
    os._exit(128 + signum)
