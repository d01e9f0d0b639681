"""Where asynccb's workers run: the CPUs given to `configure_workers`.

On an accelerator host the training thread and `tf.data` own some cores;
asynccb's worker processes and threads can be kept to the others. Linux
pins a thread on its own (`sched_setaffinity` of the calling thread), so
every asynccb thread that does work pins itself when it starts, and a
worker process is pinned before TensorFlow starts its threads.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable

__all__ = ["check_cpus", "pin_this_thread", "set_worker_cpus", "worker_cpus"]

logger = logging.getLogger("asynccb")

_cpus: frozenset[int] | None = None


def check_cpus(cpus: Iterable[int] | None) -> frozenset[int] | None:
    """`cpus` as a set, checked by the OS: a thread started for the
    purpose pins itself there (the calling thread may be pinned elsewhere
    already: the training thread, to its own CPUs).

    Raises:
        ValueError: If it is empty, holds something other than CPU numbers,
            or CPUs the OS does not let this process run on.
        NotImplementedError: If the OS cannot pin (macOS, Windows).
    """
    if cpus is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise NotImplementedError(
            "`cpus` needs os.sched_setaffinity, which this OS lacks.")
    try:
        chosen = frozenset(cpus)
    except TypeError:
        chosen = frozenset()
    if not chosen or not all(
        isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0
        for cpu in chosen
    ) or not _pinnable(chosen):
        raise ValueError(
            "`cpus` must be a non-empty set of CPU numbers this process may "
            f"run on (this machine has {os.cpu_count()}). "
            f"Received: cpus={cpus!r}")
    return chosen


def _pinnable(cpus: frozenset[int]) -> bool:
    accepted: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setaffinity(0, cpus)
            accepted.append(True)
        except (OSError, OverflowError):
            accepted.append(False)

    probe = threading.Thread(target=attempt, name="asynccb-cpus-check")
    probe.start()
    probe.join()
    return accepted[0]


def set_worker_cpus(cpus: frozenset[int] | None) -> None:
    global _cpus
    _cpus = cpus


def worker_cpus() -> frozenset[int] | None:
    """The CPUs asynccb's workers run on, or `None`: wherever the OS puts
    them (for threads: the CPUs of the thread that started them)."""
    return _cpus


def pin_this_thread() -> None:
    """Keeps the calling thread (on Linux: only it) to the worker CPUs.

    A failure (the CPUs were taken from the process since they were
    checked) is logged, and the thread runs where it is: placement is a
    preference, and a worker thread that died here would hang its lane.
    """
    cpus = _cpus
    if cpus is None:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        logger.warning("asynccb: cannot keep %s to CPUs %s (%s); it runs "
                       "where the OS puts it.",
                       threading.current_thread().name, sorted(cpus), exc)
