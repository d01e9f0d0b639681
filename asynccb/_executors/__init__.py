"""Executors: where the hooks of offloaded callbacks run.

Generic code asks for an executor by name (`get_executor`) and uses only
the interface of `base.Executor`; it never branches on a name. Each
implementation is a module of its own, imported on first use:

    "thread"    thread.py        a worker thread per callback
    "async"     event_loop.py    tasks of an anyio event loop
    "process"   process/         warm worker processes, shared
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Iterable

from asynccb._kept_memory import IDLE_TIMEOUT_S

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.base import Executor

__all__ = ["EXECUTORS", "IDLE_TIMEOUT_S", "configure_workers", "get_executor",
           "shutdown"]

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
    """Stops asynccb's warm worker processes now, and frees the snapshot
    buffers kept for the next run.

    Both go by themselves after some idle minutes (see the README) and
    at interpreter exit; call this to have their memory back at once. The
    next run starts the workers again.

    Raises:
        RuntimeError: If a run is using them: call it after `fit` returns.
    """
    from asynccb._snapshot import kept_private

    try:
        for name, (module, _) in _IMPLEMENTATIONS.items():
            if module in sys.modules:  # Only what was used holds anything.
                get_executor(name).shutdown()
    finally:
        kept_private.free()


def process_ending() -> None:
    """Lets each executor used let go of what would outlive the process,
    which is ending without its exit handlers (see `Executor.
    process_ending`)."""
    for name, (module, _) in _IMPLEMENTATIONS.items():
        if module in sys.modules:
            get_executor(name).process_ending()


def configure_workers(
    processes: int = 1,
    idle_timeout: float | None = IDLE_TIMEOUT_S,
    cpus: Iterable[int] | None = None,
) -> None:
    """Sets up the worker processes of the `"process"` executor.

    Every process-offloaded callback of the training process, in every
    list, runs in a thread of one of these workers. They start with the
    first run that needs them and stay warm between runs, so a later `fit`
    pays no TensorFlow import and finds its shadow models built.

    Args:
        processes: How many worker processes share the callbacks. One is
            enough unless the callbacks' hooks are CPU-heavy: a worker
            runs Python one thread at a time, and each worker holds its
            own TensorFlow (about half a GiB). Runs that start later use
            the new count; idle workers beyond it stop now.
        idle_timeout: Seconds without a run after which the workers stop
            (the next run starts them again) and the snapshot buffers
            kept for the next run are freed, or `None` to keep both until
            `asynccb.shutdown()` or interpreter exit.
        cpus: The CPU numbers asynccb's work runs on: its worker processes
            and, on Linux, its worker threads (each executor's threads,
            the snapshot prefill); `None` leaves them where the OS puts
            them. On a host whose training thread and input pipeline own
            some cores, give the workers the others. Idle workers on other
            CPUs stop at once, busy ones at the end of their run; the next
            run starts new ones where asked.

    Raises:
        ValueError: If an argument is out of range, or a CPU is not one
            this process may use.
        NotImplementedError: If `cpus` is given and the OS cannot pin.

    Example:

    ```python
    import os
    os.sched_setaffinity(0, {0, 1})  # Training (before TensorFlow starts).
    asynccb.configure_workers(cpus={2, 3})  # Checkpoints, logs, uploads.
    ```
    """
    from asynccb._executors import placement
    from asynccb._executors.process import pool
    from asynccb._options import check_positive_int
    from asynccb._snapshot import kept_private

    check_positive_int("processes", processes)
    if idle_timeout is not None and (
        isinstance(idle_timeout, bool)
        or not isinstance(idle_timeout, (int, float))
        or not idle_timeout > 0
    ):
        raise ValueError("`idle_timeout` must be a positive number of "
                         "seconds, or None. "
                         f"Received: idle_timeout={idle_timeout!r}")
    placement.set_worker_cpus(placement.check_cpus(cpus))
    pool.configure(processes, idle_timeout)
    kept_private.set_idle_timeout(idle_timeout)
