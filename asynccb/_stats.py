"""What offloading cost and saved: counters and timings, with a summary."""

from __future__ import annotations

import collections
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Timing", "CallbackStats", "SyncCallbackStats", "Stats"]

_MAX_SAMPLES = 10_000  # Per series: quantiles over the most recent hooks.


@dataclass(frozen=True)
class Timing:
    """Durations of one kind of event, in seconds.

    Attributes:
        count: How many events were timed.
        total_s: Their sum.
        p50_s: Median of the most recent ones (up to 10,000).
        p99_s: 99th percentile of the same.
        max_s: The longest of the same.
    """

    count: int = 0
    total_s: float = 0.0
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0


class Samples:
    """A thread-safe series of durations that summarizes into a `Timing`."""

    def __init__(self) -> None:
        self._recent: collections.deque = collections.deque(maxlen=_MAX_SAMPLES)
        self._count = 0
        self._total = 0.0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._recent.append(seconds)
            self._count += 1
            self._total += seconds

    def timing(self) -> Timing:
        with self._lock:
            if not self._recent:
                return Timing()
            values = np.fromiter(self._recent, float)
            return Timing(
                count=self._count,
                total_s=self._total,
                p50_s=float(np.percentile(values, 50)),
                p99_s=float(np.percentile(values, 99)),
                max_s=float(values.max()),
            )


class SampleMap:
    """`Samples` per key (hook name), created on first use."""

    def __init__(self) -> None:
        self._series: dict[str, Samples] = {}
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.setdefault(key, Samples())
        series.add(seconds)

    def timings(self) -> dict[str, Timing]:
        with self._lock:
            items = list(self._series.items())
        return {key: series.timing() for key, series in items}


@dataclass(frozen=True)
class CallbackStats:
    """Statistics of one offloaded callback.

    Attributes:
        name: The callback's name (its class, numbered if repeated).
        executor: `"thread"`, `"async"` or `"process"`.
        dispatched: Hooks (and saves) put on its queue.
        completed: Hooks its worker finished.
        dropped: Hooks removed by the `on_full` policy.
        cancelled: Hooks discarded after a failure or an interrupt.
        queue_high_water: The most hooks ever pending at once.
        worker_time: Per hook name, the worker's time running it.
        snapshot: Training-thread time copying model state (snapshots this
            callback asked for first; shared ones are counted once).
        enqueue: Training-thread time copying logs and queueing.
        blocked: Training-thread time waiting on a full queue or pool.
        dispatch: Training-thread time per dispatched hook, all included.
        save_paths: How many of its saves took each path: `"fast"` (copied
            into the file's learned layout) or `"keras: <why>"` (Keras'
            own writer, and the reason).
    """

    name: str
    executor: str
    dispatched: int
    completed: int
    dropped: int
    cancelled: int
    queue_high_water: int
    worker_time: dict[str, Timing]
    snapshot: Timing
    enqueue: Timing
    blocked: Timing
    dispatch: Timing
    save_paths: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SyncCallbackStats:
    """Training-thread time of one synchronous callback, per hook name."""

    name: str
    hook_time: dict[str, Timing]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Stats:
    """Statistics of an `AsyncCallbackList` (or of one `AsyncCallback`).

    Attributes:
        callbacks: Per offloaded callback name, its `CallbackStats`.
        synchronous: Per synchronous callback name, its `SyncCallbackStats`.
        snapshots: Snapshots taken (each possibly shared by several hooks).
        snapshot_bytes: Bytes copied by those snapshots (those for workers
            in this process hold the tensors read, and copy none).
        buffers: Snapshot buffers allocated (their memory is reused).
    """

    callbacks: dict[str, CallbackStats] = field(default_factory=dict)
    synchronous: dict[str, SyncCallbackStats] = field(default_factory=dict)
    snapshots: int = 0
    snapshot_bytes: int = 0
    buffers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """A readable table of what offloading cost the training thread."""
        lines = ["asynccb: offloaded callbacks"]
        header = (
            f"  {'callback':<24} {'executor':<8} {'done':>6} {'drop':>5} "
            f"{'peak q':>6} {'worker p50':>10} {'trainer p50':>11} "
            f"{'p99':>9} {'blocked':>9}"
        )
        lines.append(header)
        for stats in self.callbacks.values():
            worker = _dominant(stats.worker_time.values())
            lines.append(
                f"  {stats.name:<24.24} {stats.executor:<8} "
                f"{stats.completed:>6} {stats.dropped:>5} "
                f"{stats.queue_high_water:>6} {_ms(worker.p50_s):>10} "
                f"{_ms(stats.dispatch.p50_s):>11} "
                f"{_ms(stats.dispatch.p99_s):>9} "
                f"{_s(stats.blocked.total_s):>9}"
            )
        lines.append(
            f"  snapshots: {self.snapshots} "
            f"({self.snapshot_bytes / 2**20:.1f} MiB copied, "
            f"{self.buffers} buffer(s) reused)"
        )
        if self.synchronous:
            lines.append("asynccb: synchronous callbacks (training thread)")
            for sync in self.synchronous.values():
                total = sum(t.total_s for t in sync.hook_time.values())
                slowest = max(
                    sync.hook_time.items(),
                    key=lambda item: item[1].p50_s,
                    default=(None, Timing()),
                )
                slow = (
                    f", slowest {slowest[0]} p50 {_ms(slowest[1].p50_s)}"
                    if slowest[0] else ""
                )
                lines.append(f"  {sync.name:<24.24} total {_s(total)}{slow}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _dominant(timings: Any) -> Timing:
    """The timing of the hook that took the most worker time in total."""
    return max(timings, key=lambda t: t.total_s, default=Timing())


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s"


for _public in (Stats, CallbackStats, SyncCallbackStats, Timing):
    _public.__module__ = "asynccb"  # As users name them.
