"""Taking snapshots on the training thread, and sharing them per dispatch."""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any, Callable

from asynccb._preemption import Deadline, TooLate, no_deadline, passed
from asynccb._snapshot import (
    Buffer,
    BufferPool,
    Snapshot,
    StateLayout,
    StateLevel,
    allocate_held,
    allocate_private,
    state_variables,
)

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._lane import Lane

__all__ = ["Snapshotter"]

_Phases = dict[StateLevel, tuple[tuple, dict[int, int]]]

# Where saves' files put each live model's state (see
# `Snapshotter.offer_phases`), kept with the model, by the callbacks
# saving it: a new list or callback saving the same files of a model
# whose files were learned lays out its first snapshots for them too. Its
# first save would otherwise hold tensors, which training copies into
# fresh memory as it goes on (about a second at 1.5 GiB).
_model_phases: weakref.WeakKeyDictionary[
    Any, dict[tuple[str, ...], _Phases]] = weakref.WeakKeyDictionary()


def _phases_of(model: Any, savers: tuple[str, ...]) -> _Phases:
    """The phases known for `model` saved by `savers` (to fill in): kept
    while the model lives, or new ones for a model that cannot be weakly
    referenced."""
    try:
        by_savers = _model_phases.setdefault(model, {})
    except TypeError:
        return {}
    return by_savers.setdefault(savers, {})


class Snapshotter:
    """Takes snapshots of the live model's state for the lanes: held
    tensors, or copies into pooled buffers for worker processes, and for
    lanes in this process once a save learned where its file puts the
    state (`offer_phases`).

    Lanes that need the model at the same dispatch (one hook call from
    Keras) share one snapshot: the first takes it, the others retain it,
    until `end_window` closes the dispatch. Layouts (which variables, where
    in the buffer) are kept per state level and outlive a run, so the next
    run of the same model reuses them and their compiled readers.

    Args:
        max_snapshots: How many snapshot buffers may be alive at once.

    Attributes:
        pool: The buffers; every lane's queue of snapshots draws on it.
        snapshots: How many snapshots were taken (shared ones count once).
        snapshot_bytes: The bytes they copied (held ones copy none).
    """

    def __init__(self, max_snapshots: int):
        self.pool = BufferPool(max_snapshots, allocate_private)
        self.snapshots = 0
        self.snapshot_bytes = 0
        self._layouts: dict[StateLevel, StateLayout] = {}
        self._shared: Snapshot | None = None
        # Where a save's file puts large slots within a page, by level: the
        # variables' signature it was learned for, and the phases (see
        # `offer_phases`). By level alone, so a snapshot looks it up
        # without hashing the signature. The model's own (`_phases_of`).
        self._phases: _Phases = {}

    def forget_layouts(self, model: Any, savers: tuple[str, ...]) -> None:
        """Drops the layouts: the snapshots are of `model` now, for lanes
        whose callbacks save as `savers` say (`_roles.saver_kind`)."""
        self._layouts.clear()
        self._phases = _phases_of(model, savers)

    def offer_phases(self, level: StateLevel, signature: tuple,
                     phases: dict[int, int]) -> None:
        """Records where a save's file puts the large slots of snapshots
        of `level` and `signature` within a page (slot: offset in the
        page), learned by the lane that wrote it: the next snapshots are
        laid out so, and the save writes those slots' pages from the
        snapshot, without a copy. The first file's stay (of two formats
        saved from one snapshot, the second keeps copying). Snapshots of
        that level for this process are copies from now on (see
        `allocate_in_process`). Called from lanes' threads: one dict
        operation each, atomic, and the pool's lock."""
        known = self._phases.get(level)
        if known is None or known[0] != signature:
            self._phases[level] = (signature, dict(phases))
        self.pool.use(allocate_private, instead_of=allocate_held)

    def allocate_in_process(self) -> Callable[[int], Buffer]:
        """How a run's snapshot buffers for lanes in this process are
        made: places for held tensors, which cost the hook nothing, until a
        save learned where its file puts the state; then private memory,
        for copies laid out so, which the save writes from their pages
        (other levels' snapshots still hold: see `_holds`). A held tensor
        that training updates before the save lets go of it is copied into
        new memory, and the save copies it again to stage it: at 100 MiB
        and up that cost a save more than the copy
        (`benchmarks/save_cost.py`)."""
        return allocate_private if self._phases else allocate_held

    def take(
        self,
        model: Any,
        level: StateLevel,
        lane: Lane,
        check: Callable[[], float | None],
    ) -> tuple[Snapshot, float, float]:
        """A snapshot of `model` at `level` or more for `lane`: the one
        taken earlier in this dispatch if it has enough, else a new one.

        Waits for a free buffer when all are in use (dropping, for a lane
        whose policy allows it, its oldest pending snapshot instead);
        `check` raises if a lane failed meanwhile, and returns when to stop
        waiting (a SIGTERM's deadline) or `None`.

        Raises:
            TooLate: If no buffer came free before that time.

        Returns:
            The snapshot (retained for the lane), the seconds the copy
            took and the seconds spent waiting for a buffer.
        """
        shared = self._shared
        if shared is not None and shared.level >= level:
            return shared.retain(), 0.0, 0.0
        layout = self.layout(model, level)
        waited = 0.0
        buffer = None
        if layout.nbytes:
            buffer, waited = self._acquire(layout.nbytes, lane, check)
        start = time.perf_counter()
        held = None
        if buffer is not None and _holds(buffer, layout):
            held = layout.hold()
        elif buffer is not None:
            layout.capture(buffer)
            self.pool.prefill()  # The next snapshot's buffer, off-thread.
        snapshot = Snapshot(level, layout.spec, buffer, self.pool,
                            bool(getattr(model, "stop_training", False)),
                            held=held)
        took = time.perf_counter() - start
        self.snapshots += 1
        if held is None:
            self.snapshot_bytes += layout.nbytes
        self.end_window()
        self._shared = snapshot.retain()
        return snapshot.retain(), took, waited

    def layout(self, model: Any, level: StateLevel) -> StateLayout:
        """The layout of `model`'s state at `level`, retaken if its
        variables are no longer the ones it was made for, or laid out again
        once a save learned where its file puts them (`offer_phases`)."""
        variables = state_variables(model, level)
        layout = self._layouts.get(level)
        if layout is None or len(layout.variables) != len(variables) or any(
            a is not b for a, b in zip(layout.variables, variables)
        ):
            layout = StateLayout(level, variables)
            self._layouts[level] = layout
        known = self._phases.get(level)
        if (known is not None and not layout.spec.phases
                and known[0] == layout.spec.signature):
            layout = StateLayout(level, variables, known[1], like=layout)
            self._layouts[level] = layout
        return layout

    def _acquire(
        self, nbytes: int, lane: Lane, check: Callable[[], float | None]
    ) -> tuple[Buffer, float]:
        waited = 0.0
        while True:
            buffer, generation = self.pool.try_acquire(nbytes)
            if buffer is not None:
                return buffer, waited
            if self._shared is not None:
                self.end_window()  # It may hold the last free buffer.
                continue
            if lane.policy != "block":
                victim = lane.channel.drop_oldest_holding_snapshot()
                if victim is not None:
                    lane.record_drops([victim])
                    continue
            until = check()
            if passed(until):
                raise TooLate()
            start = time.perf_counter()
            self.pool.wait(generation, until)
            waited += time.perf_counter() - start

    def end_window(self) -> None:
        """Ends the sharing window of the current dispatch's snapshot."""
        shared, self._shared = self._shared, None
        if shared is not None:
            shared.release()

    def reserve(self, model: Any) -> None:
        """Allocates (and pages in) a buffer for a full snapshot now, at
        the start of a run, rather than in the first checkpoint's step;
        only once the state's size is known (TensorFlow builds the
        optimizer in the first step of the first `fit`)."""
        optimizer = getattr(model, "optimizer", None)
        if getattr(model, "built", False) and getattr(optimizer, "built", True):
            nbytes = self.layout(model, StateLevel.FULL).nbytes
            if nbytes:
                self.pool.reserve(nbytes)

    def close(self, deadline: Deadline = no_deadline) -> None:
        """Ends the window and frees every buffer (end of a run; see
        `BufferPool.close`)."""
        self.end_window()
        self.pool.close(deadline)


def _holds(buffer: Buffer, layout: StateLayout) -> bool:
    """Whether a snapshot in `buffer` holds tensors rather than copying:
    unless a worker process reads it (shared memory) or a save writes
    from it (laid out for the file), holding costs the hook nothing."""
    return buffer.held or (buffer.name is None and not layout.spec.phases)
