"""Snapshots: the model state an offloaded hook sees, taken at dispatch.

For workers in this process, a snapshot holds the tensors TensorFlow reads
from the model's variables, without copying them: TensorFlow never changes
a buffer that something still references (an update writes the variable a
new buffer), so what is held stays the state at dispatch. Taking one costs
the training thread a read; a buffer is copied only if training updates the
variable while the snapshot is held, by TensorFlow, once, into new memory.

For worker processes, a snapshot is a copy of the variables into a buffer
they can map, taken from a pool of reused, pre-allocated buffers: taking
one costs the training thread a memory copy; nothing is allocated per step.
So are the snapshots of a run whose checkpoints are written from their
pages (see `asynccb._snapshotter`): a copy laid out for the file, then
written with no other, costs less than a held tensor that training copies
and a save stages.

Either way the pool bounds how many snapshots are alive at once (the
memory they may hold), and snapshots are reference counted, so callbacks
that need the model at the same step share one.
"""

from __future__ import annotations

import enum
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from asynccb._kept_memory import KeptMemory
from asynccb._preemption import Deadline, join_until, no_deadline, wait_slice
from asynccb._staged_file import ALIGN, DIRECT_FROM

__all__ = [
    "StateLevel",
    "StateLayout",
    "LayoutSpec",
    "Buffer",
    "BufferPool",
    "Snapshot",
    "allocate_held",
    "allocate_private",
    "kept_private",
    "host_array",
    "state_variables",
    "variables_signature",
]

_ALIGNMENT = 64  # Bytes; keeps every variable's copy cache-line aligned.


class StateLevel(enum.IntEnum):
    """How much of the model's state a hook needs to see.

    Each level includes the ones below it.
    """

    NONE = 0
    """Nothing: the hook reads only its `logs` (CSVLogger)."""
    SCALARS = 1
    """Optimizer scalars: iterations and learning rate (TensorBoard)."""
    WEIGHTS = 2
    """Model weights, trainable and not, plus the optimizer scalars."""
    FULL = 3
    """Weights and every optimizer variable (a `.keras` checkpoint)."""

    @classmethod
    def parse(cls, value: "str | StateLevel", argument: str) -> "StateLevel":
        """Reads a level from its name, with an error naming `argument`."""
        if isinstance(value, StateLevel):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        names = ", ".join(repr(level.name.lower()) for level in cls)
        raise ValueError(
            f"`{argument}` must be one of {names}. "
            f"Received: {argument}={value!r}"
        )


def state_variables(model: Any, level: StateLevel) -> list[Any]:
    """The variables of `model` that a snapshot at `level` copies.

    The order is canonical, so a rebuilt copy of the model (the shadow)
    lists its own variables in the same order.

    Args:
        model: A Keras model, or `None`.
        level: The `StateLevel` wanted.

    Returns:
        A list of Keras variables.
    """
    if model is None or level == StateLevel.NONE:
        return []
    optimizer = getattr(model, "optimizer", None)
    optimizer_variables = list(optimizer.variables) if optimizer else []
    if level == StateLevel.FULL:
        return list(model.weights) + optimizer_variables
    # Scalars: `iterations`, a float learning rate, loss-scale counters.
    scalars = [v for v in optimizer_variables if len(v.shape) == 0]
    if level == StateLevel.SCALARS:
        return scalars
    return list(model.weights) + scalars


def host_array(tensor: Any) -> np.ndarray:
    """A read-only host view of `tensor`, without a copy.

    On TensorFlow, reading a resource variable gives a tensor that aliases
    the variable's buffer, and DLPack exposes it to NumPy without copying;
    the one copy a snapshot pays is into its own buffer. Falls back to a
    copying `.numpy()` where DLPack cannot (device memory, exotic dtypes).
    """
    try:
        return np.from_dlpack(tensor)
    except (TypeError, ValueError, RuntimeError, BufferError):
        return np.asarray(tensor.numpy())


def _reader(variables: Sequence[Any]) -> Callable[[], list]:
    """A function returning the current values of `variables` as tensors.

    One compiled TensorFlow function reads them all: a call costs about
    what one eager read does, where a model has hundreds of variables.
    It is traced here, once, and called as a concrete function: every
    layout (a new one each `fit`) has its own, and calling each through
    `tf.function` would count their first calls together as retracing of
    one function and warn after a few fits.
    """
    import tensorflow as tf

    handles = [variable.value for variable in variables]
    return tf.function(
        lambda: [handle.read_value() for handle in handles],
        autograph=False,
    ).get_concrete_function()


@dataclass(frozen=True)
class _Slot:
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def variables_signature(variables: Sequence[Any]) -> tuple:
    """Shapes and dtypes of `variables`: equal for a model and its shadow."""
    return tuple(
        (tuple(int(d) for d in v.shape), str(v.dtype)) for v in variables
    )


@dataclass(frozen=True)
class LayoutSpec:
    """Where each variable of a snapshot lives in a flat byte buffer.

    Plain data: it travels to a worker process with the snapshots it
    describes, once per layout.

    Attributes:
        level: The `StateLevel` laid out.
        slots: Offset, shape and dtype of each variable, in canonical order.
        signature: Shapes and dtypes, to check a shadow model against.
        nbytes: The buffer size needed.
    """

    level: StateLevel
    slots: tuple[_Slot, ...]
    signature: tuple
    nbytes: int
    phases: tuple[tuple[int, int], ...] = ()
    """Slots placed at a given offset within a page: `(slot, phase)`."""

    def views(self, data: np.ndarray) -> list[np.ndarray]:
        """Typed views of `data` (a uint8 buffer), one per variable."""
        return [
            data[slot.offset : slot.offset + slot.nbytes]
            .view(slot.dtype)
            .reshape(slot.shape)
            for slot in self.slots
        ]


class StateLayout:
    """The layout of some live variables, and how to capture them.

    Args:
        level: The `StateLevel` laid out.
        variables: The variables of that level, from `state_variables`.
        phases: Where within a page some slots start (slot: offset in
            the page), so that a save can write their pages from the
            buffer (see `Snapshotter.offer_phases`); the others are
            packed.
        like: A layout of the same variables, whose compiled reader this
            one shares.
    """

    def __init__(self, level: StateLevel, variables: Sequence[Any],
                 phases: dict[int, int] | None = None,
                 like: "StateLayout | None" = None):
        self.variables = list(variables)
        self._read: Callable[[], list]
        if like is not None:
            self._read = like._read
        else:
            self._read = _reader(self.variables) if self.variables else list
        phases = phases or {}
        slots = []
        offset = packed = 0
        for index, value in enumerate(self._read()):
            array = host_array(value)
            if index in phases:
                offset += (phases[index] - offset) % ALIGN
            slot = _Slot(offset, array.shape, array.dtype, array.nbytes)
            slots.append(slot)
            offset = _aligned(offset + slot.nbytes)
            packed = _aligned(packed + slot.nbytes)
            if slot.nbytes >= DIRECT_FROM or index in phases:
                packed += ALIGN  # Room to place it, as a file may ask.
        # Every layout of these variables needs the same buffer size: one
        # laid out for a file (`phases`) takes the buffer of the first.
        self.spec = LayoutSpec(
            level, tuple(slots), variables_signature(self.variables),
            max(offset, packed), tuple(sorted(phases.items())),
        )

    @property
    def level(self) -> StateLevel:
        return self.spec.level

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes

    def capture(self, buffer: "Buffer") -> None:
        """Copies the variables' current values into `buffer`."""
        for value, view in zip(self._read(), buffer.views(self.spec)):
            np.copyto(view, host_array(value), casting="no")

    def hold(self) -> list[np.ndarray]:
        """The variables' current values, without a copy: read-only views of
        the tensors read, which TensorFlow leaves as they are (see the
        module's docstring). Device memory is copied to the host."""
        return [host_array(value) for value in self._read()]


class Buffer:
    """A reusable flat byte buffer of the pool.

    Attributes:
        data: The bytes, as a uint8 NumPy array.
        name: An identifier that a worker process can attach to (the shared
            memory segment's name), or `None` for process-private memory.
    """

    def __init__(self, data: np.ndarray, name: str | None = None,
                 release: Callable[[], None] | None = None,
                 held: bool = False):
        self.data = data
        self.name = name
        self.held = held
        self.maker: Callable[[int], "Buffer"] | None = None  # Set by a pool.
        self._release = release
        self._views: tuple[Any, list[np.ndarray]] | None = None

    def views(self, spec: "LayoutSpec") -> list[np.ndarray]:
        """`spec.views(self.data)`, made once per layout and reused."""
        if self._views is None or self._views[0] is not spec:
            self._views = (spec, spec.views(self.data))
        return self._views[1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def free(self) -> None:
        """Returns the memory (end of run); once, however often called."""
        self.data = np.empty(0, np.uint8)
        self._views = None
        release, self._release = self._release, None
        if release is not None:
            release()


def allocate_held(nbytes: int) -> Buffer:
    """A place in the pool for a snapshot that holds tensors: no memory of
    its own (see `StateLayout.hold`)."""
    return Buffer(np.empty(0, np.uint8), held=True)


kept_private: KeptMemory[np.ndarray] = KeptMemory(
    size=lambda memory: memory.nbytes - ALIGN,
    drop=lambda memory: None,  # Its last reference gone, NumPy frees it.
    idle_name="asynccb-kept-memory")
"""The private snapshot memory of ended runs (see `asynccb._kept_memory`)."""


def allocate_private(nbytes: int) -> Buffer:
    """A process-private buffer of at least `nbytes`, paged in:
    page-aligned, as shared memory is, so that a slot laid out for a file
    lies at its file offset's place in a page (see `StateLayout`). The
    memory of an ended run's buffer if one is large enough, else new;
    freeing the buffer keeps its memory for the next run."""
    memory = kept_private.take(nbytes)
    if memory is None:
        memory = np.empty(max(nbytes, 1) + ALIGN, np.uint8)
        memory.fill(0)  # Page in now, not during the first snapshot.
    start = -int(memory.ctypes.data) % ALIGN
    data = memory[start:start + memory.nbytes - ALIGN]
    return Buffer(data, release=lambda: kept_private.keep(memory))


class BufferPool:
    """At most `capacity` buffers, allocated on demand and reused.

    Args:
        capacity: The maximum number of buffers alive at once; it bounds the
            memory that snapshots take.
        allocate: Makes a buffer of the given size in bytes (see `use`).
    """

    def __init__(self, capacity: int, allocate: Callable[[int], Buffer]):
        self.capacity = capacity
        self.allocate = allocate
        self._free: list[Buffer] = []
        self._count = 0
        self._nbytes = 0
        # Bumped on every release and interrupt, so a waiter never misses
        # one that happened between its failed attempt and its wait.
        self._generation = 0
        self.high_water = 0  # The most buffers ever alive at once.
        self.allocations = 0  # Buffers allocated over the pool's life.
        self._prefill: threading.Thread | None = None
        self._waiting = 0  # Producers blocked in `wait`.
        # Reentrant: a SIGTERM handler on the training thread may wake
        # the waits (`interrupt`) while that thread is inside a method.
        self._cond = threading.Condition(threading.RLock())

    # A buffer is reused only while it fits: it is as large as the largest
    # layout asked for (an optimizer built after the first snapshot grows
    # it) and was made by the current allocator (a worker process joining
    # the run needs shared memory). Any other is retired: freed when free.

    def _reusable(self, buffer: Buffer) -> bool:
        return (buffer.held or buffer.nbytes >= self._nbytes) and (
            buffer.maker is self.allocate)

    def _retire_free(self) -> None:
        keep = [buffer for buffer in self._free if self._reusable(buffer)]
        for buffer in self._free:
            if not self._reusable(buffer):
                buffer.free()
                self._count -= 1
        self._free = keep

    def _new(self, nbytes: int) -> Buffer:
        """Allocates a buffer for a slot already counted in `_count`."""
        allocate = self.allocate
        try:
            buffer = allocate(nbytes)
        except BaseException:
            with self._cond:
                self._count -= 1
            raise
        buffer.maker = allocate
        with self._cond:
            self.allocations += 1
            self.high_water = max(self.high_water, self._count)
        return buffer

    def use(self, allocate: Callable[[int], Buffer],
            instead_of: Callable[[int], Buffer] | None = None) -> None:
        """Makes new buffers with `allocate` from now on; given
        `instead_of`, only if that is the allocator now (one atomic step:
        lanes' threads and the training thread both switch it)."""
        with self._cond:
            if instead_of is not None and self.allocate is not instead_of:
                return
            if allocate is not self.allocate:
                self.allocate = allocate
                self._retire_free()

    def reserve(self, nbytes: int) -> None:
        """Allocates one buffer ahead of need, off the hot path."""
        with self._cond:
            self._nbytes = max(self._nbytes, nbytes)
            self._retire_free()
            if self._count:
                return
            self._count = 1
        buffer = self._new(self._nbytes)
        self.release(buffer)

    def try_acquire(self, nbytes: int) -> tuple[Buffer | None, int]:
        """A free buffer of at least `nbytes`, or `None` if all are in use.

        Returns:
            The buffer or `None`, and the generation to pass to `wait`.
        """
        with self._cond:
            self._nbytes = max(self._nbytes, nbytes)
            self._retire_free()
            generation = self._generation
            if self._free:
                return self._free.pop(), generation
            if self._count >= self.capacity:
                return None, generation
            self._count += 1
            size = self._nbytes
        return self._new(size), generation

    def prefill(self) -> None:
        """Allocates the next buffer in the background if the pool may
        grow and has none free, so that the snapshot that needs it does not
        pay for allocating and paging in its memory (a second per GiB)."""
        with self._cond:
            if (self._free or self._count >= self.capacity or not self._nbytes
                    or self.allocate is allocate_held
                    or (self._prefill is not None
                        and self._prefill.is_alive())):
                return
            self._count += 1  # Its slot, taken now: the bound holds.
            self._prefill = threading.Thread(
                target=self._allocate_free, args=(self._nbytes,),
                name="asynccb-prefill", daemon=True)
            self._prefill.start()

    def _allocate_free(self, nbytes: int) -> None:
        from asynccb._executors.placement import pin_this_thread

        pin_this_thread()  # Paging in is work: on the workers' CPUs.
        # On failure `_new` gives the slot back and this thread reports the
        # error; the snapshot that needs a buffer allocates it itself and
        # raises what this raised.
        self.release(self._new(nbytes))

    def wait(self, generation: int, until: float | None = None) -> None:
        """Blocks until a release or `interrupt` after `generation`, the
        `time.monotonic()` time `until`, or a slice of time: the caller
        looks again (a SIGTERM may have set a deadline meanwhile)."""
        with self._cond:
            self._waiting += 1
            self._cond.notify_all()  # For `wait_blocked`.
            try:
                if self._generation == generation:
                    self._cond.wait(wait_slice(until))
            finally:
                self._waiting -= 1

    def wait_blocked(self, timeout: float | None = None) -> bool:
        """Waits until a snapshot waits for a free buffer.

        For observing backpressure (tests, monitoring) without polling.

        Returns:
            Whether one waits (`False` after `timeout` seconds).
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting > 0, timeout)

    def interrupt(self) -> None:
        """Wakes the waiters of `wait`, so they can look for errors or a
        SIGTERM's deadline."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def release(self, buffer: Buffer) -> None:
        with self._cond:
            self._free.append(buffer)
            self._retire_free()
            self._generation += 1
            self._cond.notify_all()

    def close(self, deadline: Deadline = no_deadline) -> None:
        """Frees every buffer (end of run, when none is held any more).

        The pool stays usable: the next run allocates afresh, for what may
        be another model.

        Args:
            deadline: A SIGTERM's, if any: past it, a buffer still being
                allocated is left to the process' end.
        """
        prefill = self._prefill
        if prefill is None or join_until(prefill, deadline):
            self._prefill = None
        with self._cond:
            self._nbytes = 0
            for buffer in self._free:
                buffer.free()
            self._count -= len(self._free)
            self._free.clear()


_serials = itertools.count()


class Snapshot:
    """Model state captured at dispatch, shared by the hooks that need it.

    Args:
        level: The `StateLevel` captured.
        layout: The `LayoutSpec` of the captured variables.
        buffer: The `Buffer` holding the bytes, or `None` when the layout
            is empty.
        pool: The pool `buffer` returns to when the last holder releases.
        stop_training: The model's `stop_training` flag at dispatch.
        held: The values, when held rather than copied into `buffer`.

    Attributes:
        serial: Unique in the training process: a shadow that already
            holds this snapshot (for another lane) need not copy it again.
    """

    def __init__(self, level: StateLevel, layout: LayoutSpec,
                 buffer: Buffer | None, pool: BufferPool | None,
                 stop_training: bool, held: list[np.ndarray] | None = None):
        self.serial = next(_serials)
        self._held = held
        self.level = level
        self.layout = layout
        self.buffer = buffer
        self.stop_training = stop_training
        self._pool = pool
        self._holders = 0
        self._lock = threading.Lock()

    def arrays(self) -> list[np.ndarray]:
        """The captured values, one array per variable (views, not copies)."""
        if self._held is not None:
            return self._held
        if self.buffer is None:
            return []
        return self.buffer.views(self.layout)

    def retain(self) -> "Snapshot":
        with self._lock:
            self._holders += 1
        return self

    def let_go_of(self, index: int) -> None:
        """Drops the held value of variable `index` (snapshot order), if
        the caller is the snapshot's only holder and reads it no more (a
        save wrote it): TensorFlow then need not copy the variable when
        training updates it before the rest is written."""
        with self._lock:
            # One holder: the dispatch that took it has ended (it holds the
            # snapshot while it may share it), so no one can take it again.
            if self._holders == 1 and self._held is not None:
                self._held[index] = None  # type: ignore[call-overload]

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._held = None  # TensorFlow may free or reuse them now.
        if last and self.buffer is not None and self._pool is not None:
            buffer, self.buffer = self.buffer, None
            self._pool.release(buffer)


StateLevel.__module__ = "asynccb"  # As users name it.
