"""Where training's threads run: the Python thread that drives the steps
and TensorFlow's threads (Linux: per-thread CPU affinity).

With one TensorFlow thread, a Keras `fit` keeps two threads busy. On 2
cores the OS puts them on one core or on two and keeps them there for a
while; the two placements run at two different speeds
(`thread_placement.py` measures them). These helpers fix the placement
for a run, so that a figure divided by a no-callback run's speed is not
divided by a coin flip.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

MODES = ("free", "together", "apart")


def tensorflow_threads() -> list[int]:
    """The native ids of this process' threads that TensorFlow named
    (`tf_...`: its compute pools and the input pipeline's)."""
    ids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().startswith("tf_"):
                    ids.append(int(tid))
        except FileNotFoundError:
            continue  # It ended while we looked.
    return ids


def place(mode: str, cpus: set[int]) -> None:
    """Sets the CPUs of the calling (driving) thread and of TensorFlow's
    threads for `mode`: "free" (both may use all of `cpus`), "together"
    (both on the first of `cpus`) or "apart" (the caller on the first,
    TensorFlow's on the second)."""
    if mode not in MODES:
        raise ValueError(f"placement {mode!r}: expected one of {MODES}")
    first, second = sorted(cpus)[:2]
    driver_cpus, tensorflow_cpus = {
        "free": (cpus, cpus), "together": ({first}, {first}),
        "apart": ({first}, {second})}[mode]
    os.sched_setaffinity(threading.get_native_id(), driver_cpus)
    for tid in tensorflow_threads():
        with contextlib.suppress(ProcessLookupError):  # It ended.
            os.sched_setaffinity(tid, tensorflow_cpus)


@contextlib.contextmanager
def placed(mode: str) -> Iterator[bool]:
    """Training's threads in `mode` for the block, then free again on the
    CPUs the caller had. Yields whether it placed them: not for "free",
    nor where fewer than two CPUs are allowed (a run pinned whole to one
    CPU) or the OS has no per-thread affinity."""
    cpus = (os.sched_getaffinity(0)
            if hasattr(os, "sched_setaffinity") else set())
    if mode == "free" or len(cpus) < 2:
        yield False
        return
    place(mode, cpus)
    try:
        yield True
    finally:
        place("free", cpus)
