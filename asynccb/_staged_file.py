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

# Blocks gathered for one write at most (`pwritev` takes up to IOV_MAX
# pieces, 1024 on Linux): past it, they are written.
_GATHERED_MAX = 256
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16

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


def _page() -> memoryview:
    """The thread's page-aligned page, for a kept page (see `keep`)."""
    page = getattr(_local, "page", None)
    if page is None or len(page) != ALIGN:
        page = _local.page = mmap.mmap(-1, ALIGN)
    return memoryview(page)


def _aligned_up(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def address(piece: memoryview) -> int:
    """Where `piece`'s bytes start in memory."""
    return int(np.frombuffer(piece, np.uint8).ctypes.data)


def _nothing(piece: memoryview) -> None:
    pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    _pwritev_all(fd, [data], offset)


def _pwritev_all(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Writes `pieces`, one after another, at `offset`."""
    pieces = [piece for piece in pieces if piece]
    while pieces:  # A short write (a signal, a full disk): go on.
        done = os.pwritev(fd, pieces[:_IOV_MAX], offset)
        offset += done
        while pieces and done >= len(pieces[0]):
            done -= len(pieces.pop(0))
        if done:
            pieces[0] = pieces[0][done:]


class StagedFile:
    """A new file at `path`, written in order through a staging buffer.

    What is added goes to the file in as few writes as it can: the staged
    bytes and the blocks written from their own memory are gathered, and
    one `pwritev` writes them all when the staging buffer is full, too
    many blocks wait, or at `flush`. With direct I/O each write is a
    request the writer waits for (on a VM, a notification of the virtual
    disk); one request for a whole 10 MiB file costs half the kernel CPU
    of one per block.

    Args:
        path: The file to create (or truncate).
        direct: Whether to try direct I/O (`O_DIRECT`); a file system that
            refuses it at `open` gets the page cache at once, one that
            refuses the first write raises `DirectIORefused`.

    Attributes:
        offset: Bytes added so far.
        written: Bytes in the file so far (the rest waits).
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
        self._staged = 0  # Bytes of the staging buffer in use.
        self._run = 0  # Where the staged bytes not yet gathered start.
        # What waits to be written at `written`, in order: staged runs
        # (views of the staging buffer) and blocks from their own memory.
        self._gathered: list[memoryview] = []
        self._then: list[Callable[[], None]] = []
        self._keep: int | None = None  # The start of the page to keep.
        self._kept: memoryview | None = None  # Its bytes, once written.

    def add(self, block: memoryview, chunk: int = STAGE_BYTES,
            before: Callable[[memoryview], None] = _nothing,
            stage: bool = False) -> None:
        """Adds `block` as the file's next bytes: copied into the staging
        buffer, or (a direct file, a block of `DIRECT_FROM` bytes or more
        lying at the same place in a page as its offset in the file, not
        `stage`d) written from its own memory, its unaligned ends staged.

        `before` is called with each piece just before it is staged (at
        most `chunk` bytes: a checksum reads it while it is in the cache)
        or gathered (the whole pages written from memory, in one piece);
        `offset` is then where the piece starts. A block written from its
        memory must stay as it is until `flush`; one `stage`d (bytes the
        caller patches) is copied whatever its size."""
        if (self.direct and not stage and len(block) >= DIRECT_FROM
                and (address(block) - self.offset) % ALIGN == 0):
            head = -self.offset % ALIGN
            end = head + (len(block) - head) // ALIGN * ALIGN
            self._add_staged(block[:head], chunk, before)
            self._add_direct(block[head:end], before)
            block = block[end:]
        self._add_staged(block, chunk, before)

    def _add_staged(self, block: memoryview, chunk: int,
                    before: Callable[[memoryview], None]) -> None:
        while block:
            piece = block[:min(chunk, len(self._stage) - self._staged)]
            before(piece)
            self._stage[self._staged:self._staged + len(piece)] = piece
            self._staged += len(piece)
            self.offset += len(piece)
            block = block[len(piece):]
            if self._staged == len(self._stage):
                self._write()

    def _add_direct(self, block: memoryview,
                    before: Callable[[memoryview], None]) -> None:
        """Gathers `block` (whole pages, at a page's start in the file and
        in memory) after what is staged, which ends at a page too."""
        before(block)
        self._gather_run()
        self._gathered.append(block)
        self.offset += len(block)
        if len(self._gathered) >= _GATHERED_MAX:
            self._write()

    def _gather_run(self) -> None:
        if self._staged > self._run:
            self._gathered.append(self._stage[self._run:self._staged])
            self._run = self._staged

    def _write(self) -> None:
        """Writes what was gathered and staged (and any padding staged
        past `offset`)."""
        self._gather_run()
        if self._keep is not None and self.direct:
            self._copy_kept(self._keep)
        try:
            _pwritev_all(self.fd, self._gathered, self.written)
        except OSError as exc:
            if self.direct and not self.written and exc.errno in _REFUSALS:
                raise DirectIORefused(str(exc)) from exc
            raise
        self.written = self.offset
        self._gathered, self._staged, self._run = [], 0, 0
        done, self._then = self._then, []
        for call in done:
            call()

    def keep(self, offset: int) -> None:
        """Keeps a copy of the page holding `offset` when it is written
        (one page per file): a `patch` within it then writes the page from
        the copy, where direct I/O would read it back from the disk."""
        self._keep, self._kept = offset // ALIGN * ALIGN, None

    def _copy_kept(self, page: int) -> None:
        at = self.written
        for piece in self._gathered:
            start, stop = max(page, at), min(page + ALIGN, at + len(piece))
            if start < stop:
                if self._kept is None:
                    self._kept = _page()
                self._kept[start - page:stop - page] = piece[start - at:
                                                             stop - at]
            at += len(piece)

    def then(self, done: Callable[[], None]) -> None:
        """Calls `done` once what was added so far is in the file."""
        self._then.append(done)

    def flush(self) -> None:
        """Writes what was added."""
        # A direct file's last write is padded to a page (cut off below),
        # with zeros, not an earlier file's bytes.
        pad = -self.offset % ALIGN if self.direct else 0
        self._stage[self._staged:self._staged + pad] = bytes(pad)
        self._staged += pad
        self._write()
        if pad:
            os.ftruncate(self.fd, self.offset)

    def patch(self, offset: int, data: bytes) -> None:
        """Sets `data` at `offset`, in the file or in the staging buffer
        (bytes added, and staged or written: those not added yet are the
        caller's)."""
        end, at = offset + len(data), self.written
        for piece in self._gathered + [self._stage[self._run:self._staged]]:
            start, stop = max(offset, at), min(end, at + len(piece))
            if start < stop:
                assert not piece.readonly and piece.obj is self._stage.obj, \
                    "patched bytes are staged"
                piece[start - at:stop - at] = data[start - offset:
                                                   stop - offset]
            at += len(piece)
        if offset < self.written:
            self._patch_written(offset, data[:self.written - offset])

    def _patch_written(self, offset: int, data: bytes) -> None:
        if not self.direct:
            _pwrite_all(self.fd, memoryview(data), offset)
            return
        start = offset // ALIGN * ALIGN
        kept = self._kept
        if (kept is not None and start == self._keep
                and offset + len(data) <= start + ALIGN):
            kept[offset - start:offset - start + len(data)] = data
            _pwrite_all(self.fd, kept, start)
            if start + ALIGN > self.written:  # Past the file's end.
                os.ftruncate(self.fd, self.written)
            return
        # Direct I/O reads and writes whole blocks: read them back, set
        # the bytes, write them again (a checksum's 4 bytes: one block).
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
