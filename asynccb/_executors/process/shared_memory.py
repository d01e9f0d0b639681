"""Snapshot buffers in shared memory, for worker processes.

The training process creates each buffer once, touches its pages, and
reuses it for the whole run; a worker maps it by name and reads the
snapshot from it in place. A run's buffers outlive it, kept warm for the
next run (see `_KeptSegments`). Buffers are named `asynccb-<pid>-<token>`,
so a leftover segment in `/dev/shm` is easy to attribute. If the training
process is killed, multiprocessing's resource tracker unlinks them.
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import uuid
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from asynccb._kept_memory import KEPT, KeptMemory
from asynccb._snapshot import Buffer

__all__ = ["allocate_shared", "free_kept", "kept_segments", "SharedBuffers",
           "SEGMENT_PREFIX"]

SEGMENT_PREFIX = "asynccb-"
_SHM = "/dev/shm"  # Where Linux lists POSIX shared memory segments.
_kept: KeptMemory[shared_memory.SharedMemory] = KeptMemory(
    size=lambda segment: segment.size,
    drop=lambda segment: _unlink(segment))
"""Segments whose run ended, kept for the next run's buffers.

A new segment costs its fresh pages twice: the training process pages it
in, and the warm worker maps it again (see `asynccb._kept_memory`). A
kept segment is still paged in here and still mapped in the worker (its
name is the same). They live as long as the warm workers they serve: the
workers' idle timeout, `asynccb.shutdown()` and interpreter exit unlink
them.
"""
free_kept = _kept.free
# Registered after the dispatcher's exit hook (this module is imported
# when a run first needs it), so it runs first: runs closing after it
# unlink their segments as they go.
atexit.register(_kept.free, closing=True)


def kept_segments() -> list[str]:
    """The names of the segments kept for the next run."""
    return [segment.name for segment in _kept.pieces()]


def _unlink(segment: shared_memory.SharedMemory) -> None:
    segment.unlink()
    try:
        segment.close()
    except BufferError:
        # A view of it is still referenced somewhere; the mapping goes when
        # that view does. The name is already gone.
        pass


def allocate_shared(nbytes: int) -> Buffer:
    """A buffer of at least `nbytes` in shared memory, paged in: a segment
    kept from an ended run if one is large enough, else a new one. Freeing
    the buffer keeps its segment for the next run."""
    segment = _kept.take(nbytes)
    if segment is None:
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        segment = shared_memory.SharedMemory(name=name, create=True,
                                             size=max(nbytes, 1))
        data = np.ndarray((nbytes,), np.uint8, buffer=segment.buf)
        data.fill(0)  # Page in now, not during the first snapshot.
    data = np.ndarray((segment.size,), np.uint8, buffer=segment.buf)
    return Buffer(data, name=segment.name,
                  release=lambda: _kept.keep(segment))


def _attach(name: str) -> shared_memory.SharedMemory:
    if sys.version_info >= (3, 13):  # Attach without registering for cleanup.
        return shared_memory.SharedMemory(name=name, track=False)
    segment = shared_memory.SharedMemory(name=name)
    # Older Pythons register every attachment with the resource tracker,
    # which would then unlink the training process' segment when this
    # worker exits. The creator owns it: unregister it under the name it
    # was registered with (the private `_name`, with its leading slash).
    resource_tracker.unregister(
        segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


def _unlinked(name: str) -> bool:
    """Whether segment `name` was removed by its creator (its run ended);
    `False` where that cannot be seen (no `/dev/shm`: not Linux)."""
    return os.path.isdir(_SHM) and not os.path.exists(
        os.path.join(_SHM, name))


class SharedBuffers:
    """A worker's mappings of the training process' buffers, by name: one
    per segment, shared by the lanes that read it (each mapping is also a
    registration with the resource tracker, which counts none twice).

    Args:
        capacity: How many mappings the open lanes need (their pools never
            have more buffers alive). Lanes add their share as they open
            (`grow`) and take it back as they close (`shrink`). Beyond it,
            up to `KEPT` more stay mapped, least recently used
            closed first: the training process keeps that many segments
            of ended runs for its next runs, which then find them mapped
            here. Segments removed by the training process are unmapped
            first (an unlinked segment stays in memory while mapped).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._mapped: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def grow(self, capacity: int) -> None:
        with self._lock:
            self.capacity += capacity

    def shrink(self, capacity: int) -> None:
        """Takes back a closed lane's share, closing the least recently
        used mappings beyond what is left."""
        with self._lock:
            self.capacity -= capacity
            self._trim()

    def _trim(self) -> None:
        for gone in [n for n in self._mapped if _unlinked(n)]:
            self._close(self._mapped.pop(gone))
        while len(self._mapped) > self.capacity + KEPT:
            self._close(self._mapped.popitem(last=False)[1])

    def array(self, name: str, nbytes: int) -> np.ndarray:
        """The first `nbytes` of segment `name`, as a uint8 array."""
        with self._lock:
            return self._array(name, nbytes)

    def _array(self, name: str, nbytes: int) -> np.ndarray:
        entry = self._mapped.get(name)
        if entry is None:
            # Map it whole: one buffer serves snapshots of several sizes.
            segment = _attach(name)
            entry = (segment, np.ndarray((segment.size,), np.uint8,
                                         buffer=segment.buf))
            self._mapped[name] = entry
            # A new segment: the runs whose segments are gone will send
            # none again (lanes stay warm after their run, and keep their
            # share, which would keep them in memory for nothing).
            self._trim()
        else:
            self._mapped.move_to_end(name)
        return entry[1][:nbytes]

    @staticmethod
    def _close(entry) -> None:
        segment, _ = entry
        try:
            segment.close()
        except BufferError:
            pass  # A shadow still reads from it; unmapped when it is done.

    def close(self) -> None:
        with self._lock:
            while self._mapped:
                self._close(self._mapped.popitem()[1])
