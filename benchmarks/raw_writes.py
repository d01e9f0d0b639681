"""Raw writes: what a checkpoint's bytes cost with no format around them.

No TensorFlow here: these measure the machine, not a model.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Iterable

import numpy as np

RAW_WRITE_CHUNK = 8 * 2**20


def own_cpu_seconds() -> float:
    """User plus system CPU seconds of this process (all its threads).

    `time.process_time` is the same sum as `os.times()`' user + system,
    read with nanosecond resolution instead of clock ticks (10 ms here):
    a single raw write of a checkpoint's bytes costs about that much.
    """
    return time.process_time()


def _pieces(data: memoryview) -> Iterable[memoryview]:
    for start in range(0, len(data), RAW_WRITE_CHUNK):
        yield data[start:start + RAW_WRITE_CHUNK]


def _repeated(chunk: memoryview, nbytes: int) -> Iterable[memoryview]:
    for start in range(0, nbytes, len(chunk)):
        yield chunk[:min(len(chunk), nbytes - start)]


def write_pieces(path: str, pieces: Iterable[memoryview],
                 keep_cached: bool) -> None:
    """Writes `pieces` to a new file (`os.write`), then fsyncs it; then,
    unless `keep_cached`, lets the kernel drop the file's pages from its
    cache, as asynccb's saves do (a plain write, and Keras' saves, keep
    them: each later write then takes new pages, which on a VM whose free
    memory goes back to its host cost many times their copy)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for piece in pieces:
            while piece:
                piece = piece[os.write(fd, piece):]
        os.fsync(fd)
        if not keep_cached:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_and_sync(path: str, data: memoryview,
                   keep_cached: bool = False) -> None:
    """Writes `data` to a new file in pieces of 8 MiB (see `write_pieces`):
    the least any checkpoint format can cost for its bytes."""
    write_pieces(path, _pieces(data), keep_cached)


def raw_write_seconds(nbytes: int, directory: str,
                      repeats: int = 5) -> dict[str, float]:
    """What writing `nbytes` costs with no format around them: a new file
    written with `os.write` from a reused 8 MiB chunk, then fsynced (and
    removed after: the next write reuses its pages); the medians of
    `repeats` writes' CPU seconds (this process) and wall seconds."""
    # Random bytes: a file system that compresses or dedupes gains nothing.
    chunk = memoryview(np.random.default_rng(0).bytes(
        min(RAW_WRITE_CHUNK, max(nbytes, 1))))
    path = os.path.join(directory, "raw-write.bin")
    return {"bytes": nbytes, **median_cost(
        lambda: write_pieces(path, _repeated(chunk, nbytes), keep_cached=True),
        repeats, then=lambda: os.remove(path))}


def median_cost(call: Callable[[], None], repeats: int,
                then: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Calls `call` `repeats` times, each followed by `then` (outside the
    measure); the medians of their CPU seconds (this process) and wall
    seconds."""
    cpu, wall = [], []
    for _ in range(repeats):
        cpu_start, start = own_cpu_seconds(), time.perf_counter()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(own_cpu_seconds() - cpu_start)
        then()
    return {"cpu_s": statistics.median(cpu),
            "wall_s": statistics.median(wall), "repeats": repeats}
