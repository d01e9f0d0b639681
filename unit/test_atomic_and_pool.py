"""Atomic writes and the snapshot buffer pool, without TensorFlow."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import pytest

from asynccb._kept_memory import KEPT
from asynccb._saving import atomic_path
from asynccb._snapshot import BufferPool, allocate_private


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"previous")
    with atomic_path(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        assert tmp.endswith(".keras") and os.path.basename(tmp).startswith(".")
        with open(tmp, "wb") as file:
            file.write(b"new")
        assert target.read_bytes() == b"previous"  # Not yet.
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]

    with pytest.raises(ZeroDivisionError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "wb") as file:
                file.write(b"half")
            1 / 0
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["model.keras"]


def _cached_pages(path) -> int:
    """How many of the file's pages are in the page cache (`mincore`)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        # A private mapping, so ctypes can take its address; nothing is
        # written, so mincore reports the file's own pages.
        mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        view = (ctypes.c_char * size).from_buffer(mapped)
        pages = -(-size // mmap.PAGESIZE)
        vector = (ctypes.c_ubyte * pages)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)),
                        ctypes.c_size_t(size), vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del view
        return sum(page & 1 for page in vector)
    finally:
        mapped.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux only")
def test_a_saved_file_leaves_the_page_cache(tmp_path):
    """The checkpoint is on disk (fsync) and its pages are given back, so
    the next save reuses them instead of taking new memory."""
    payload = os.urandom(4 * 2**20)
    kept = tmp_path / "plain.bin"
    kept.write_bytes(payload)
    fd = os.open(kept, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    if _cached_pages(kept) == 0:
        pytest.skip("this file system does not keep written pages cached")
    target = tmp_path / "model.weights.h5"
    with atomic_path(str(target)) as tmp:
        with open(tmp, "wb") as file:
            file.write(payload)
        assert _cached_pages(tmp) > 0  # Cached while written.
    assert _cached_pages(target) == 0
    assert _cached_pages(kept) > 0  # A plain write's pages stay.
    assert target.read_bytes() == payload


def test_pool_reuses_at_most_capacity_buffers():
    pool = BufferPool(2, allocate_private)
    first, _ = pool.try_acquire(100)
    second, _ = pool.try_acquire(100)
    third, generation = pool.try_acquire(100)
    assert third is None  # The bound holds.
    pool.release(first)
    again, _ = pool.try_acquire(100)
    assert again is first  # Reused, not reallocated.
    assert pool.allocations == 2 and pool.high_water == 2
    pool.release(again)
    pool.release(second)
    pool.close()


def test_pool_retires_buffers_that_no_longer_fit():
    pool = BufferPool(2, allocate_private)
    small, _ = pool.try_acquire(64)
    pool.release(small)
    large, _ = pool.try_acquire(4096)  # The optimizer was built: grows.
    assert large is not small and large.nbytes >= 4096
    assert small.nbytes == 0  # Freed, not kept beside the larger one.
    pool.release(large)
    pool.close()


def test_a_closed_lane_gives_its_mappings_back():
    """A warm worker maps each run's snapshot segments; a lane that closes
    takes its share back: the segments the training process removed are
    unmapped (an unlinked segment stays in memory while mapped), and of
    those it keeps for its next runs, as many as it keeps stay mapped."""
    from asynccb._executors.process import shared_memory

    kept = KEPT
    buffers = shared_memory.SharedBuffers(0)
    segments = [shared_memory.allocate_shared(4096)
                for _ in range(kept + 2)]
    try:
        buffers.grow(len(segments))  # A lane opens.
        views = [buffers.array(segment.name, 16) for segment in segments]
        assert len(buffers._mapped) == len(segments)
        del views  # The lane's tasks are done with them.
        segments[0].free()  # Kept by the training process: still there.
        buffers.shrink(len(segments))  # The lane closes.
        assert list(buffers._mapped) == [s.name for s in segments[2:]]
        shared_memory.free_kept()  # Removed: unmapped at the next look.
        buffers.shrink(0)
        assert list(buffers._mapped) == [s.name for s in segments[2:]]
        for segment in segments[2:]:
            segment.free()
        shared_memory.free_kept()
        buffers.shrink(0)
        assert not buffers._mapped
    finally:
        for segment in segments:
            segment.free()
        shared_memory.free_kept()
        buffers.close()


def test_a_freed_shared_buffer_is_kept_for_the_next_run():
    """Freeing a shared buffer keeps its segment, which the next buffer
    that fits in it reuses (paged in already); beyond the bound the least
    recently kept are removed, and `free_kept` removes all."""
    from asynccb._executors.process import shared_memory

    first = shared_memory.allocate_shared(8192)
    name = first.name
    first.data[:4] = 7
    first.free()
    assert shared_memory.kept_segments() == [name]
    try:
        smaller = shared_memory.allocate_shared(2048)  # A quarter: new.
        assert smaller.name != name
        again = shared_memory.allocate_shared(4096)  # Fits: reused whole.
        assert (again.name, again.nbytes) == (name, 8192)
        assert list(again.data[:4]) == [7] * 4
        larger = shared_memory.allocate_shared(16384)  # Does not fit.
        assert larger.name != name
        smaller.free()
        again.free()
        larger.free()
        many = [shared_memory.allocate_shared(4096)
                for _ in range(KEPT + 1)]
        names = [buffer.name for buffer in many]
        assert names[0] == name  # The smallest that fits comes first.
        for buffer in many:
            buffer.free()
        assert shared_memory.kept_segments() == names[1:]
        assert not os.path.exists(f"/dev/shm/{names[0]}")
    finally:
        shared_memory.free_kept()
    assert shared_memory.kept_segments() == []
    assert not os.path.exists(f"/dev/shm/{name}")


def _kept_countdowns() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name == "asynccb-kept-memory"]


def test_a_freed_private_buffer_is_kept_for_the_next_run():
    """Freeing a private buffer (a run's end) keeps its memory, page
    aligned and paged in, for the next buffer that fits in it (at most
    twice its size); the idle countdown then gives it back and ends, and
    so does `asynccb.shutdown()`."""
    import asynccb
    from asynccb._snapshot import kept_private
    from asynccb._staged_file import ALIGN, address

    kept_private.free()  # Earlier tests' pools.
    for countdown in _kept_countdowns():
        countdown.join(5)  # Cancelled by that: ends at once.
    first = allocate_private(3 * ALIGN)
    assert address(first.data) % ALIGN == 0 and first.nbytes >= 3 * ALIGN
    start = address(first.data)
    first.data[:4] = 7
    first.free()
    assert len(kept_private.pieces()) == 1 and len(_kept_countdowns()) == 1
    larger = allocate_private(8 * ALIGN)  # Does not fit: new memory.
    smaller = allocate_private(ALIGN)  # Fits, but would waste it: new.
    assert start not in (address(larger.data), address(smaller.data))
    assert len(kept_private.pieces()) == 1
    again = allocate_private(2 * ALIGN)  # Fits: the same memory.
    assert address(again.data) == start and list(again.data[:4]) == [7] * 4
    assert kept_private.pieces() == []
    larger_start = address(larger.data)
    for buffer in (again, larger, smaller):
        buffer.free()
    assert len(kept_private.pieces()) == 3
    larger = allocate_private(7 * ALIGN)  # Not the first kept: taken.
    assert address(larger.data) == larger_start
    larger.free()
    asynccb.shutdown()
    assert kept_private.pieces() == []
    for countdown in _kept_countdowns():
        countdown.join(5)  # Cancelled: ends at once.
    assert not _kept_countdowns()

    try:
        allocate_private(ALIGN).free()
        [ten_minutes] = _kept_countdowns()  # The default.
        kept_private.set_idle_timeout(0.05)  # Counts down again: 50 ms.
        ten_minutes.join(5)  # Cancelled: ends at once.
        assert not ten_minutes.is_alive()
        for countdown in _kept_countdowns():  # Unless it ended already.
            countdown.join(5)  # It fires, gives the memory back, and ends.
        assert kept_private.pieces() == [] and not _kept_countdowns()
    finally:
        kept_private.set_idle_timeout(asynccb._executors.IDLE_TIMEOUT_S)
