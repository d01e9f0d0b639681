"""The run watch: ends a run whose Keras `fit` raised past its hooks.

Keras calls no `on_*_end` hook when `fit` (or `evaluate`, `predict`)
raises, so nothing would tell the workers that the run is over. A watch
thread looks, a few times a second, whether the run's `fit` frame is still
on the training thread's stack; once it is gone, it asks the dispatcher to
finish the queued hooks (nothing is lost) and stop the workers.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._dispatcher import Dispatcher

__all__ = ["RunWatch", "keras_run_frame", "thread_frames"]

# How often the watch looks. It only matters when `fit` raised past our
# hooks: then it bounds how long the workers outlive it before they finish
# their queues and stop.
_WATCH_PERIOD_S = 0.2


def keras_run_frame() -> Any:
    """The frame of Keras' `fit`/`evaluate`/`predict` running this hook.

    Keras calls no `on_*_end` hook when `fit` raises, so nothing would tell
    the workers that the run is over; the run watch looks for this frame
    instead. In a hand-written loop the caller is the user's code, which
    calls the end hooks itself: no frame is watched.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(("asynccb", "keras.src.callbacks")):
            return frame if module.startswith("keras.") else None
        frame = frame.f_back
    return None


def thread_frames() -> dict[int, FrameType]:
    """`sys._current_frames()`, with the cyclic garbage collector off.

    CPython 3.11 holds its lock on the list of threads while it makes the
    frames' objects; a collection that one of those allocations starts
    may free a `threading.local`, whose cleanup takes that lock again, and
    the process hangs for good (python/cpython#106883; a benchmark's `fit`
    hung so, TensorFlow's graphs holding the locals). The call holds the
    GIL throughout, so no other thread turns the collector back on during
    it; one that turned it off before is left as it was.
    """
    if not gc.isenabled():
        return sys._current_frames()
    gc.disable()
    try:
        return sys._current_frames()
    finally:
        gc.enable()


class RunWatch:
    """Closes a dispatcher whose Keras run left the stack without ending.

    Args:
        dispatcher: The dispatcher to close.
        frame: The `fit`/`evaluate`/`predict` frame of the run.
    """

    def __init__(self, dispatcher: "Dispatcher", frame: Any):
        self._dispatcher = weakref.ref(dispatcher)
        self._frame = frame
        self._where = frame.f_code.co_name
        self._thread_id = threading.get_ident()
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._watch, name="asynccb-run-watch", daemon=True
        )
        self._thread.start()

    @property
    def where(self) -> str:
        """The name of the watched function (`fit`, `evaluate`, ...)."""
        return self._where

    def run_alive(self) -> bool:
        """Whether the watched frame is still on its thread's stack."""
        frame = thread_frames().get(self._thread_id)
        while frame is not None:
            if frame is self._frame:
                return True
            frame = frame.f_back
        return False

    def _watch(self) -> None:
        while not self._stopped.wait(_WATCH_PERIOD_S):
            if self.run_alive():
                continue
            dispatcher = self._dispatcher()
            if dispatcher is None or dispatcher.abandon(self):
                self._frame = None
                return

    def stop(self) -> None:
        self._stopped.set()
        self._frame = None
        if threading.current_thread() is not self._thread:
            self._thread.join()
