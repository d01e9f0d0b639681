"""A checkpoint file learned once, then rewritten from snapshot buffers.

Within a run, a model's checkpoint has the same structure every time: only
the numbers change. A `Template` holds the bytes of a file Keras wrote that
do not depend on the state (HDF5 metadata, zip headers, the model's config)
and where each variable's bytes go; a later save of the same layout is those
bytes with each snapshot buffer placed at its dataset's offset, written in
one pass: about one copy of the state into the file.

Learning proves the template: every dataset of the file must be a variable
of the snapshot (see `asynccb._save_sources`), stored contiguously,
uncompressed, with exactly the snapshot's bytes for that state. A `.keras`
file must be the three stored entries Keras writes (metadata, config,
weights) and nothing else (no assets); its weights entry's checksum and its
`date_saved` are computed afresh for each save, and entries Keras stamps
with the time of saving get the time of this one.
"""

from __future__ import annotations

import collections
import datetime
import functools
import json
import os
import struct
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from asynccb._errors import CannotCopySave
from asynccb._staged_file import ALIGN, DIRECT_FROM, DirectIORefused, StagedFile

try:  # ISA-L's CRC-32: ~7x zlib's, which would cost more than the write.
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without its wheels.
    from zlib import crc32

__all__ = ["Template", "learn_weights_file", "learn_keras_file"]

# Checksummed in chunks that stay in the cache between the checksum reading
# them and their copy into the staging buffer (`asynccb._staged_file`).
_CHUNK = 256 * 2**10
_COMPARE_CHUNK = 8 * 2**20
# Whether saves try direct I/O (tests switch it off to cover the page
# cache's path on a file system that takes both).
_DIRECT_IO = True

_METADATA, _CONFIG, _WEIGHTS = "metadata.json", "config.json", "model.weights.h5"
_UNSTAMPED = (1980, 1, 1, 0, 0, 0)  # What Keras' `zf.open(name, "w")` gives.


@dataclass
class _Region:
    offset: int
    nbytes: int
    slot: int


@dataclass
class _Stamp:
    """Where a zip entry's checksum and time are, in its local header and
    in the central directory."""

    local: int
    central: int
    timed: bool  # Keras stamps it with the time of saving.


@dataclass
class Template:
    """A file's state-independent bytes, and where each slot goes.

    Attributes:
        size: The file's size in bytes.
        regions: Where each slot's bytes go, by offset.
        fixed: The bytes between regions (`len(regions) + 1` pieces).
        config_key: For `.keras` files, the optimizer's floating-point
            scalars when learned (a learning rate): the config Keras writes
            depends on them, so a snapshot with others needs Keras.
    """

    size: int
    regions: list[_Region]
    fixed: list[bytearray]
    config_key: bytes = b""
    key_slots: tuple[int, ...] = ()
    weights_span: tuple[int, int] | None = None  # Of the zip entry.
    weights_stamp: _Stamp | None = None
    metadata_span: tuple[int, int] | None = None
    metadata_stamp: _Stamp | None = None
    date_at: int = 0  # Offset of `date_saved`'s value in the metadata.
    direct: bool | None = None  # Whether the last write took direct I/O.
    _fixed_starts: list[int] = field(default_factory=list)
    # A write patches the fixed pieces (time, checksums): one at a time,
    # when two lanes save the same model's files.
    _writing: threading.Lock = field(default_factory=threading.Lock,
                                     repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, offset = [], 0
        for piece, region in zip(self.fixed, self.regions + [None]):
            starts.append(offset)
            offset += len(piece) + (region.nbytes if region else 0)
        self._fixed_starts = starts

    def phases(self) -> dict[int, int]:
        """Where the file puts each slot it writes from the slot's own
        memory when that memory is at the same place in a page (slot:
        offset within a page; see `asynccb._staged_file`): none where
        saves go through the page cache, which copies all."""
        if not _DIRECT_IO or self.direct is False:
            return {}
        count = collections.Counter(r.slot for r in self.regions)
        return {r.slot: r.offset % ALIGN for r in self.regions
                if r.nbytes >= DIRECT_FROM and count[r.slot] == 1}

    def fits(self, arrays: Sequence[np.ndarray]) -> bool:
        """Whether the config learned holds for a snapshot (`.keras`)."""
        return _key(arrays, self.key_slots) == self.config_key

    def write(self, path: str, arrays: Sequence[np.ndarray],
              written: Callable[[int], None] = lambda slot: None) -> None:
        """Writes the file for the state in `arrays` (snapshot order).

        `written` is called with each slot once its bytes are in the file,
        after which the writer holds no reference to it: the caller may
        let go of it while later slots are written.
        """
        with self._writing:
            if self.weights_span is not None:
                self._stamp_time(time.time())
            out = StagedFile(path, direct=_DIRECT_IO)
            try:
                try:
                    self._write_blocks(out, arrays, written)
                except DirectIORefused:
                    # At its first write, before any slot was let go of.
                    out.close()
                    out = StagedFile(path, direct=False)
                    self._write_blocks(out, arrays, written)
                self.direct = out.direct
            finally:
                out.close()

    def _write_blocks(self, out: StagedFile, arrays: Sequence[np.ndarray],
                      written: Callable[[int], None]) -> None:
        """Writes the fixed pieces and the data in file order; a `.keras`
        file's weights entry is checksummed in chunks of `_CHUNK` bytes,
        each just before it is staged (while it is in the cache), or whole
        where it is written from its memory, and its checksum set before
        the central directory is added (and in the entry's header, staged
        or written by then)."""
        weights: tuple[tuple[int, int] | None, int] = (self.weights_span, 0)
        if self.weights_stamp is not None:  # Its checksum, set last.
            out.keep(self.weights_stamp.local + 14)
        regions_left = collections.Counter(r.slot for r in self.regions)
        for piece, region in zip(self.fixed, self.regions):
            weights = self._add(out, memoryview(piece), weights, stage=True)
            # Viewed as it is written, under no name here: once its last
            # batch is written, this writer references it no more.
            weights = self._add(out, _bytes(arrays[region.slot]).data,
                                weights)
            regions_left[region.slot] -= 1
            if not regions_left[region.slot]:
                out.then(functools.partial(written, region.slot))
        self._add(out, memoryview(self.fixed[-1]), weights, stage=True)
        out.flush()

    def _add(self, out: StagedFile, block: memoryview,
             weights: tuple[tuple[int, int] | None, int],
             stage: bool = False) -> tuple[tuple[int, int] | None, int]:
        """Adds `block` to `out` (staged: a fixed piece, which the next
        save patches), checksumming what of it lies in the weights entry:
        `weights` is that entry's span of the file (`None` once its
        checksum is set) and the checksum so far; returns them updated."""
        span, crc = weights
        if span is None or out.offset >= span[1]:
            out.add(block, stage=stage)
            return span, crc

        def checksum(chunk: memoryview) -> None:
            nonlocal span, crc
            if span is None:
                return
            a = max(span[0] - out.offset, 0)
            b = min(span[1] - out.offset, len(chunk))
            if a < b:
                crc = crc32(chunk[a:b], crc)
            if out.offset + len(chunk) >= span[1]:
                self._set_weights_crc(out, crc)
                span = None

        out.add(block, _CHUNK, checksum, stage)
        return span, crc

    # The zip entries' fields, patched in the fixed pieces.

    def _stamp_time(self, now: float) -> None:
        """Sets `date_saved`, the metadata's checksum, and the time of the
        entries Keras stamps with the time of saving."""
        assert self.metadata_span is not None and self.metadata_stamp
        date = datetime.datetime.fromtimestamp(now).strftime(
            "%Y-%m-%d@%H:%M:%S").encode()
        self._patch(self.metadata_span[0] + self.date_at, date)
        metadata = self.fixed_bytes(*self.metadata_span)
        assert metadata is not None, "learned: the metadata is fixed bytes"
        self._set_crc(self.metadata_stamp, crc32(metadata))
        dt = time.localtime(now)
        dos = struct.pack(
            "<HH", dt.tm_hour << 11 | dt.tm_min << 5 | dt.tm_sec // 2,
            (dt.tm_year - 1980) << 9 | dt.tm_mon << 5 | dt.tm_mday)
        for stamp in (self.metadata_stamp, self.weights_stamp):
            if stamp is not None and stamp.timed:
                # Time and date: at +10 in a local header, +12 in central.
                self._patch(stamp.local + 10, dos)
                self._patch(stamp.central + 12, dos)

    def _set_weights_crc(self, out: StagedFile, crc: int) -> None:
        """Sets the weights entry's checksum in the fixed pieces (for the
        central directory, still to be added), and in the local header
        `out` has already."""
        assert self.weights_stamp is not None
        self._set_crc(self.weights_stamp, crc)
        out.patch(self.weights_stamp.local + 14, struct.pack("<I", crc))

    def _set_crc(self, stamp: _Stamp, crc: int) -> None:
        # CRC-32: at +14 in a local header, +16 in the central directory.
        self._patch(stamp.local + 14, struct.pack("<I", crc))
        self._patch(stamp.central + 16, struct.pack("<I", crc))

    def _locate(self, offset: int) -> tuple[int, int]:
        for index in range(len(self.fixed) - 1, -1, -1):
            if self._fixed_starts[index] <= offset:
                local = offset - self._fixed_starts[index]
                assert local < len(self.fixed[index]), "not a fixed byte"
                return index, local
        raise AssertionError(offset)

    def _patch(self, offset: int, value: bytes) -> None:
        index, local = self._locate(offset)
        self.fixed[index][local:local + len(value)] = value

    def fixed_bytes(self, start: int, end: int) -> bytes | None:
        """The file's bytes from `start` to `end`, if they all lie in one
        fixed piece (`None` otherwise)."""
        for piece, piece_start in zip(self.fixed, self._fixed_starts):
            if piece_start <= start and end <= piece_start + len(piece):
                return bytes(piece[start - piece_start:end - piece_start])
        return None


def _bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _key(arrays: Sequence[np.ndarray], slots: tuple[int, ...]) -> bytes:
    return b"".join(_bytes(arrays[slot]).tobytes() for slot in slots)


# Learning.


def _datasets(h5file: Any) -> dict[str, tuple[int | None, int, Any]]:
    """Each dataset's name, file offset (None if unallocated), storage size
    and layout class."""
    import h5py

    found: dict[str, tuple[int | None, int, Any]] = {}

    def visit(name: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset):
            return
        plist = item.id.get_create_plist()
        if plist.get_layout() != h5py.h5d.CONTIGUOUS or plist.get_nfilters():
            raise CannotCopySave(f"dataset {name} is chunked or filtered")
        found[name] = (item.id.get_offset(), item.id.get_storage_size(),
                       item.dtype)

    h5file.visititems(visit)
    return found


def _regions(fileobj: Any, base: int, slots: dict[str, int],
             arrays: Sequence[np.ndarray]) -> list[_Region]:
    """The data regions of the HDF5 file in `fileobj` (at `base` in the
    outer file), each matched to its slot."""
    import h5py

    with h5py.File(fileobj, "r") as h5file:
        datasets = _datasets(h5file)
    unknown = sorted(set(datasets) - set(slots))
    if unknown:
        raise CannotCopySave(f"dataset {unknown[0]} holds no known variable")
    missing = sorted(set(slots) - set(datasets))
    if missing:
        raise CannotCopySave(f"dataset {missing[0]} was not written")
    regions = []
    for name, (offset, size, dtype) in datasets.items():
        array = arrays[slots[name]]
        if size != array.nbytes or dtype.itemsize != array.itemsize:
            raise CannotCopySave(
                f"dataset {name} stores {size} bytes of {dtype}, the "
                f"variable {array.nbytes} bytes of {array.dtype}")
        if size:
            assert offset is not None, name
            regions.append(_Region(base + offset, size, slots[name]))
    regions.sort(key=lambda region: region.offset)
    return regions


def _fixed_pieces(fd: int, size: int, regions: list[_Region],
                  arrays: Sequence[np.ndarray]) -> list[bytearray]:
    """Reads the bytes between regions, and checks each region holds its
    slot's bytes (the proof that the mapping is the file's)."""
    fixed, offset = [], 0
    for region in regions + [_Region(size, 0, -1)]:
        if region.offset < offset:
            raise CannotCopySave("two datasets overlap")
        fixed.append(bytearray(os.pread(fd, region.offset - offset, offset)))
        if region.nbytes:
            expected = _bytes(arrays[region.slot])
            for lo in range(0, region.nbytes, _COMPARE_CHUNK):
                chunk = os.pread(fd, min(_COMPARE_CHUNK, region.nbytes - lo),
                                 region.offset + lo)
                if chunk != expected[lo:lo + len(chunk)].tobytes():
                    raise CannotCopySave(
                        f"the file's bytes at {region.offset} are not the "
                        "snapshot's")
        offset = region.offset + region.nbytes
    return fixed


def learn_weights_file(path: str, slots: dict[str, int],
                       arrays: Sequence[np.ndarray]) -> Template:
    """Learns the template of a `.weights.h5` file Keras just wrote from
    the state in `arrays`.

    Raises:
        CannotCopySave: If the file holds anything the template cannot
            rebuild.
    """
    regions = _regions(path, 0, slots, arrays)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return Template(size, regions, _fixed_pieces(fd, size, regions,
                                                     arrays))
    finally:
        os.close(fd)


def _central_headers(fd: int, size: int) -> dict[str, int]:
    """Offset of each entry's central directory header."""
    end = os.pread(fd, 22, size - 22)
    if len(end) != 22 or end[:4] != b"PK\x05\x06":
        raise CannotCopySave("the zip ends with a comment or in zip64")
    count, length, start = struct.unpack("<HII", end[10:20])
    directory = os.pread(fd, length, start)
    headers, at = {}, 0
    for _ in range(count):
        if directory[at:at + 4] != b"PK\x01\x02":
            raise CannotCopySave("the zip's central directory is not plain")
        name_len, extra_len, comment_len = struct.unpack(
            "<HHH", directory[at + 28:at + 34])
        name = directory[at + 46:at + 46 + name_len].decode()
        headers[name] = start + at
        at += 46 + name_len + extra_len + comment_len
    return headers


def learn_keras_file(path: str, slots: dict[str, int],
                     arrays: Sequence[np.ndarray],
                     key_slots: tuple[int, ...]) -> Template:
    """Learns the template of a `.keras` file Keras just wrote from the
    state in `arrays`; `key_slots` are the snapshot's floating-point
    optimizer scalars (see `Template.config_key`).

    Raises:
        CannotCopySave: If the file holds anything the template cannot
            rebuild.
    """
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        if set(infos) != {_METADATA, _CONFIG, _WEIGHTS}:
            extra = sorted(set(infos) - {_METADATA, _CONFIG, _WEIGHTS})
            raise CannotCopySave(
                f"the .keras file holds {extra[0] if extra else 'no weights'}"
                " (assets, or another weights format)")
        for info in infos.values():
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 8:
                raise CannotCopySave(f"zip entry {info.filename} is "
                                     "compressed or has a data descriptor")
        metadata = json.loads(archive.read(_METADATA))
    fd = os.open(path, os.O_RDONLY)
    try:
        starts = {name: _data_start(fd, info) for name, info in infos.items()}
        member = _Slice(fd, starts[_WEIGHTS], infos[_WEIGHTS].file_size)
        regions = _regions(member, starts[_WEIGHTS], slots, arrays)
        size = os.fstat(fd).st_size
        central = _central_headers(fd, size)
        fixed = _fixed_pieces(fd, size, regions, arrays)
    finally:
        os.close(fd)
    def stamp(name: str) -> _Stamp:
        return _Stamp(infos[name].header_offset, central[name],
                      timed=infos[name].date_time != _UNSTAMPED)

    weights = infos[_WEIGHTS]
    metadata_span = (starts[_METADATA],
                     starts[_METADATA] + infos[_METADATA].file_size)
    template = Template(
        size, regions, fixed,
        config_key=_key(arrays, key_slots), key_slots=key_slots,
        weights_span=(starts[_WEIGHTS], starts[_WEIGHTS] + weights.file_size),
        weights_stamp=stamp(_WEIGHTS),
        metadata_span=metadata_span,
        metadata_stamp=stamp(_METADATA),
    )
    date = str(metadata.get("date_saved", "")).encode()
    raw = json.dumps(metadata).encode()
    if not date or raw != template.fixed_bytes(*metadata_span):
        raise CannotCopySave("Keras' metadata.json is not the one known")
    template.date_at = raw.index(date)
    return template


class _Slice:
    """A read-only file object over `size` bytes of `fd` from `start`: the
    stored weights entry, for h5py to read where it lies (zipfile's entry
    reader rereads from the entry's start on every backward seek)."""

    def __init__(self, fd: int, start: int, size: int):
        self._fd, self._start, self._size, self._at = fd, start, size, 0

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at,
                os.SEEK_END: self._size}[whence]
        self._at = base + offset
        return self._at

    def tell(self) -> int:
        return self._at

    def read(self, size: int = -1) -> bytes:
        end = self._size if size < 0 else min(self._at + size, self._size)
        data = os.pread(self._fd, max(end - self._at, 0),
                        self._start + self._at)
        self._at += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)


def _data_start(fd: int, info: zipfile.ZipInfo) -> int:
    header = os.pread(fd, 30, info.header_offset)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len
