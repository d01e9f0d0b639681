"""A new file written in order through a staging buffer, with direct I/O
where the file system takes it.

A fast save writes a file made of many pieces at odd offsets (the HDF5
metadata between datasets, each variable's bytes). They are copied into a
page-aligned staging buffer, and each full buffer goes to the file in one
write. A large piece whose memory lies at its file offset's place in a
page (a snapshot laid out for the file: see `asynccb._snapshot`) skips the
copy: its whole pages go to the file straight from it, only its unaligned
ends staged. Opened with `O_DIRECT`, the file takes
the buffer straight to the disk, with no copy into the page cache, no page
cache to fill, write back and drop: on this project's machine (ext4 on a
virtio disk, Linux 6.18) a fast save costs 0.55-0.74 of the same save
through the page cache at 10-100 MiB, the staging copy included (medians
of paired ratios, `benchmarks/save_cost.py`). A file system that refuses
direct I/O (tmpfs before Linux 6.6, some network and FUSE file systems)
gets the same buffer through the page cache, whose pages the save drops
once synced (`asynccb._saving`).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Callable

import numpy as np

__all__ = ["ALIGN", "DIRECT_FROM", "DirectIORefused", "StagedFile", "STAGE_BYTES"]

STAGE_BYTES = 8 * 2**20
"""The staging buffer's size: each write but a file's last is this big."""

ALIGN = 4096
"""What direct I/O asks to be aligned (memory, file offsets, sizes): the
largest logical block size in common use, a page. The staging buffer is
page-aligned and written at multiples of it; a file's last write is
padded to it, and the file cut back to its size."""

# A piece is written straight from its memory from this size up: below it,
# a copy into the staging buffer costs less than the write of its own.
DIRECT_FROM = 256 * 2**10

# Each saving thread stages through its own buffer, kept while the thread
# lives: a buffer mapped anew for each save would cost a page fault per
# page (and on a VM that hands free memory back to its host, more).
_local = threading.local()

# The errors with which a file system refuses direct I/O.
_REFUSALS = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


class DirectIORefused(Exception):
    """The file system refused a direct write before any was made: the
    file must be written again, through the page cache."""


def _stage() -> memoryview:
    buffer = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) != STAGE_BYTES:
        buffer = _local.buffer = mmap.mmap(-1, STAGE_BYTES)
    return memoryview(buffer)


def _aligned_up(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def address(piece: memoryview) -> int:
    """Where `piece`'s bytes start in memory."""
    return int(np.frombuffer(piece, np.uint8).ctypes.data)


def _nothing(piece: memoryview) -> None:
    pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # A short write (a signal, a full disk): go on.
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


class StagedFile:
    """A new file at `path`, written in order through a staging buffer.

    Args:
        path: The file to create (or truncate).
        direct: Whether to try direct I/O (`O_DIRECT`); a file system that
            refuses it at `open` gets the page cache at once, one that
            refuses the first write raises `DirectIORefused`.

    Attributes:
        offset: Bytes added so far.
        written: Bytes in the file so far (the rest is staged).
        direct: Whether the file is written with direct I/O.
    """

    def __init__(self, path: str, direct: bool = True):
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        o_direct = getattr(os, "O_DIRECT", 0)
        self.direct = bool(direct and o_direct)
        if self.direct:
            try:
                self.fd = os.open(path, flags | o_direct, 0o666)
            except OSError as exc:
                if exc.errno not in _REFUSALS:
                    raise
                self.direct = False
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
        self.offset = self.written = 0
        self._stage = _stage()
        self._then: list[Callable[[], None]] = []

    def add(self, block: memoryview, chunk: int = STAGE_BYTES,
            before: Callable[[memoryview], None] = _nothing) -> None:
        """Adds `block` as the file's next bytes: copied into the staging
        buffer, or (a direct file, a block of `DIRECT_FROM` bytes or more
        lying at the same place in a page as its offset in the file)
        written straight from its memory, its unaligned ends staged.

        `before` is called with each piece of at most `chunk` bytes just
        before it is staged or written (a checksum reads it while it is in
        the cache); `offset` is then where the piece starts."""
        if (self.direct and len(block) >= DIRECT_FROM
                and (address(block) - self.offset) % ALIGN == 0):
            head = -self.offset % ALIGN
            end = head + (len(block) - head) // ALIGN * ALIGN
            self._add_staged(block[:head], chunk, before)
            self._add_direct(block[head:end], chunk, before)
            block = block[end:]
        self._add_staged(block, chunk, before)

    def _add_staged(self, block: memoryview, chunk: int,
                    before: Callable[[memoryview], None]) -> None:
        while block:
            at = self.offset - self.written
            piece = block[:min(chunk, len(self._stage) - at)]
            before(piece)
            self._stage[at:at + len(piece)] = piece
            self.offset += len(piece)
            block = block[len(piece):]
            if self.offset - self.written == len(self._stage):
                self.flush()

    def _add_direct(self, block: memoryview, chunk: int,
                    before: Callable[[memoryview], None]) -> None:
        """Writes `block` (whole pages, at a page's start in the file and
        in memory) from its memory, after what is staged."""
        self.flush()  # Ends at a page: no padding.
        for start in range(0, len(block), chunk):
            piece = block[start:start + chunk]
            before(piece)
            self.offset += len(piece)
        try:
            _pwrite_all(self.fd, block, self.written)
        except OSError as exc:
            if not self.written and exc.errno in _REFUSALS:
                raise DirectIORefused(str(exc)) from exc
            raise
        self.written = self.offset

    def then(self, done: Callable[[], None]) -> None:
        """Calls `done` once what was added so far is in the file."""
        self._then.append(done)

    def flush(self) -> None:
        """Writes what is staged."""
        staged = self.offset - self.written
        size = _aligned_up(staged) if self.direct else staged
        # Padding (cut off below): zeros, not an earlier file's bytes.
        self._stage[staged:size] = bytes(size - staged)
        try:
            _pwrite_all(self.fd, self._stage[:size], self.written)
        except OSError as exc:
            if self.direct and not self.written and exc.errno in _REFUSALS:
                raise DirectIORefused(str(exc)) from exc
            raise
        if size != staged:  # The last write, padded: cut the padding off.
            os.ftruncate(self.fd, self.offset)
        self.written = self.offset
        done, self._then = self._then, []
        for call in done:
            call()

    def patch(self, offset: int, data: bytes) -> None:
        """Sets `data` at `offset`, in the file or in the staging buffer
        (bytes added only: those not added yet are the caller's)."""
        end = offset + len(data)
        staged_from, staged_to = max(offset, self.written), min(end,
                                                                self.offset)
        if staged_from < staged_to:
            self._stage[staged_from - self.written:staged_to - self.written] \
                = data[staged_from - offset:staged_to - offset]
        if offset < self.written:
            self._patch_written(offset, data[:self.written - offset])

    def _patch_written(self, offset: int, data: bytes) -> None:
        if not self.direct:
            _pwrite_all(self.fd, memoryview(data), offset)
            return
        # Direct I/O reads and writes whole blocks: read them back, set
        # the bytes, write them again (a checksum's 4 bytes: one block).
        start = offset // ALIGN * ALIGN
        block = mmap.mmap(-1, _aligned_up(offset + len(data)) - start)
        try:
            os.preadv(self.fd, [block], start)
            block[offset - start:offset - start + len(data)] = data
            _pwrite_all(self.fd, memoryview(block), start)
            if start + len(block) > self.written:  # Past the file's end.
                os.ftruncate(self.fd, self.written)
        finally:
            block.close()

    def close(self) -> None:
        """Closes the file (not synced; what is staged and not flushed is
        not written)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
