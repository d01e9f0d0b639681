"""asynccb: run slow Keras callbacks off the training thread.

Wrap a callback in `AsyncCallback` to run its hooks in a worker thread, a
worker process or an anyio task, on a snapshot of the model taken at
dispatch; or use `AsyncCallbackList`, a `keras.callbacks.CallbackList` that
offloads the known-slow built-ins by itself. Callbacks that control
training stay synchronous.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "configure_workers",
    "shutdown",
    "AsyncCallback",
    "AsyncCallbackList",
    "AsyncCallbackError",
    "WorkerDiedError",
    "ControlFromWorkerError",
    "StateLevel",
    "Stats",
    "CallbackStats",
    "SyncCallbackStats",
    "Timing",
]

__version__ = "0.1.0"

# Imported on first use: a worker process imports this package to set
# itself up (hide accelerators, limit threads) before TensorFlow loads.
_EXPORTS = {
    "configure_workers": "asynccb._executors",
    "shutdown": "asynccb._executors",
    "AsyncCallback": "asynccb._async_callback",
    "AsyncCallbackList": "asynccb._callback_list",
    "AsyncCallbackError": "asynccb._errors",
    "WorkerDiedError": "asynccb._errors",
    "ControlFromWorkerError": "asynccb._errors",
    "StateLevel": "asynccb._snapshot",
    "Stats": "asynccb._stats",
    "CallbackStats": "asynccb._stats",
    "SyncCallbackStats": "asynccb._stats",
    "Timing": "asynccb._stats",
}

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors import configure_workers, shutdown
    from asynccb._async_callback import AsyncCallback
    from asynccb._callback_list import AsyncCallbackList
    from asynccb._errors import (
        AsyncCallbackError,
        ControlFromWorkerError,
        WorkerDiedError,
    )
    from asynccb._snapshot import StateLevel
    from asynccb._stats import CallbackStats, Stats, SyncCallbackStats, Timing


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asynccb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
