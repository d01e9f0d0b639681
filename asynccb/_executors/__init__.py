"""Executors: where the hooks of offloaded callbacks run.

Generic code asks for an executor by name (`get_executor`) and uses only
the interface of `base.Executor`; it never branches on a name. Each
implementation is a module of its own, imported on first use:

    "thread"    thread.py        a worker thread per callback
    "async"     event_loop.py    tasks of an anyio event loop
    "process"   process/         a worker process per callback
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.base import Executor

__all__ = ["EXECUTORS", "get_executor", "shutdown"]

_IMPLEMENTATIONS = {
    "thread": ("asynccb._executors.thread", "ThreadExecutor"),
    "process": ("asynccb._executors.process.executor", "ProcessExecutor"),
    "async": ("asynccb._executors.event_loop", "AsyncExecutor"),
}

EXECUTORS = tuple(_IMPLEMENTATIONS)
"""The executor names, in the order error messages list them."""


def get_executor(name: str) -> type[Executor]:
    """The executor class registered as `name`.

    Raises:
        ValueError: If no executor has that name.
    """
    try:
        module, attribute = _IMPLEMENTATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"`executor` must be one of {', '.join(map(repr, EXECUTORS))}. "
            f"Received: executor={name!r}"
        ) from None
    return getattr(importlib.import_module(module), attribute)


def shutdown() -> None:
    """Stops asynccb's warm worker processes now.

    They stop by themselves after some idle minutes (see the README) and
    at interpreter exit; call this to have their memory back at once. The
    next run starts them again.

    Raises:
        RuntimeError: If a run is using them: call it after `fit` returns.
    """
    for name, (module, _) in _IMPLEMENTATIONS.items():
        if module in sys.modules:  # Only what was used can hold anything.
            get_executor(name).shutdown()
