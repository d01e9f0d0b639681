"""asynccb: run slow Keras callbacks off the training thread.

Wrap a callback in `AsyncCallback` to run its hooks in a worker thread or an
anyio task, on a snapshot of the model taken at dispatch; or use
`AsyncCallbackList`, a `keras.callbacks.CallbackList` that offloads the
known-slow built-ins by itself. Callbacks that control training stay
synchronous.
"""

from asynccb._async_callback import AsyncCallback
from asynccb._callback_list import AsyncCallbackList
from asynccb._errors import AsyncCallbackError
from asynccb._snapshot import StateLevel
from asynccb._stats import CallbackStats, Stats, SyncCallbackStats, Timing
from asynccb._tasks import ControlFromWorkerError

__all__ = [
    "AsyncCallback",
    "AsyncCallbackList",
    "AsyncCallbackError",
    "ControlFromWorkerError",
    "StateLevel",
    "Stats",
    "CallbackStats",
    "SyncCallbackStats",
    "Timing",
]

__version__ = "0.1.0"
