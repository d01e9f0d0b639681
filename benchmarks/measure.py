"""Measuring instruments for the benchmarks: timers, memory, CPU, the
memcpy floor, a probe of the machine's speed, and checkpoint verification
against plain Keras."""

from __future__ import annotations

import io
import os
import statistics
import threading
import time
import zipfile
from typing import Any, Callable

import h5py
import keras
import numpy as np

from asynccb._hooks import ALL_HOOKS, BATCH_HOOKS, EPOCH_HOOKS, call_hook
from raw_writes import own_cpu_seconds


def state_nbytes(model: Any) -> int:
    """Bytes of the model's weights plus its optimizer's variables."""
    variables = list(model.weights) + list(model.optimizer.variables)
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize
                   for v in variables))


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Median time of one plain memory copy of `nbytes` (pages touched
    first): the physical floor of any snapshot of that much state."""
    source = np.ones(max(nbytes, 1), np.uint8)
    target = np.zeros_like(source)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# The probe: a fixed CPU-bound job timed before every run. 64x64x64 float32
# products stay under OpenBLAS' threshold for threading (m*n*k <= 4*65536),
# so the probe runs on one core, as the training thread does; 15,000 of
# them take about 70 ms on the 2-core machine of the README's figures.
PROBE_SIZE = 64
PROBE_ROUNDS = 15_000


def cpu_probe(size: int = PROBE_SIZE, rounds: int = PROBE_ROUNDS) -> float:
    """Wall seconds of a fixed, single-threaded, CPU-bound job, now.

    The job never changes, so a probe slower than the benchmark's usual
    one says the machine was slower at that moment (another process on
    our core, a lower clock), whatever the code under test does.
    """
    rng = np.random.default_rng(0)
    left = rng.random((size, size), dtype=np.float32)
    right = rng.random((size, size), dtype=np.float32)
    out = np.empty_like(left)
    start = time.perf_counter()
    for _ in range(rounds):
        np.matmul(left, right, out=out)
    return time.perf_counter() - start


class CpuWindow:
    """CPU seconds of this process (`trainer_s`) and of its descendants,
    asynccb's worker processes (`workers_s`), between `begin` and `end`.

    The descendants are found by walking /proc; each walk is done outside
    the span of this process' own reading, so it is not counted.
    """

    def __init__(self) -> None:
        self._trainer = self._workers = 0.0
        self.trainer_s: float | None = None
        self.workers_s: float | None = None

    def begin(self) -> None:
        self._workers = descendants_cpu_and_rss()[0]
        self._trainer = own_cpu_seconds()

    def end(self) -> None:
        self.trainer_s = own_cpu_seconds() - self._trainer
        self.workers_s = descendants_cpu_and_rss()[0] - self._workers


ASYNCCB_WORKER = "asynccb._executors.process.worker"


def descendants_cpus(command: str = ASYNCCB_WORKER) -> list[int]:
    """The CPUs this process' descendants whose command line holds
    `command` (asynccb's worker processes) may run on, together (empty if
    there are none): where the workers really ran. Other descendants
    (multiprocessing's resource tracker) are left out: they inherit the
    training thread's CPUs."""
    cpus: set[int] = set()
    for pid in _descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as line:
                if command.encode() not in line.read():
                    continue
            cpus |= os.sched_getaffinity(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # Exited since the walk.
    return sorted(cpus)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (0 if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants_cpu_and_rss() -> tuple[float, int]:
    """CPU seconds and resident bytes of this process' descendants (its
    worker processes), now."""
    pids = _descendants(os.getpid())
    return (sum(cpu_seconds(pid) for pid in pids),
            sum(rss_bytes(pid) for pid in pids))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if parent == pid:
                children.append(int(entry))
    return children + [d for c in children for d in _descendants(c)]


class PeakMemory:
    """Samples the resident memory of this process and its descendants
    (worker processes) every `period` seconds; keeps the peak.

    A sampler, not a synchronisation: it only reads `/proc`.
    """

    def __init__(self, period: float = 0.05):
        self.period = period
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> int:
        pid = os.getpid()
        total = rss_bytes(pid) + sum(rss_bytes(c) for c in _descendants(pid))
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> "PeakMemory":
        self.start_bytes = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="bench-memory")
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class CopyFloor:
    """Times a plain memory copy of `nbytes` right where a checkpoint
    happens, after its hook: the physical floor of a snapshot, under the
    same cache and memory-bandwidth conditions (a copy measured apart, in
    a warm cache, would flatter small states)."""

    def __init__(self, nbytes: int):
        self.source = np.ones(max(nbytes, 1), np.uint8)
        self.target = np.zeros_like(self.source)
        self.times: list[float] = []

    def measure(self) -> None:
        start = time.perf_counter()
        np.copyto(self.target, self.source)
        self.times.append(time.perf_counter() - start)


class CheckpointClock:
    """Times, on the training thread, `on_train_batch_end` at checkpoint
    steps and `on_train_end`; shared by `SaveTimer` and `TimedList`.

    Args:
        every: Checkpoint every this many steps (global step count).
        after: Steps not timed (the warm-up).
        floor: A `CopyFloor` to measure at each timed checkpoint.
    """

    def __init__(self, every: int, after: int = 0,
                 floor: CopyFloor | None = None):
        self.every = every
        self.after = after
        self.floor = floor
        self.step = 0
        self.save_times: list[float] = []
        self.end_time = 0.0

    def batch_end(self, call: Callable[[], None]) -> None:
        self.step += 1
        start = time.perf_counter()
        call()
        if self.step % self.every == 0 and self.step > self.after:
            self.save_times.append(time.perf_counter() - start)
            if self.floor is not None:
                self.floor.measure()

    def train_end(self, call: Callable[[], None]) -> None:
        start = time.perf_counter()
        call()
        self.end_time = time.perf_counter() - start


class SaveTimer(keras.callbacks.Callback):
    """Forwards every hook to `inner`, timing it with a `CheckpointClock`
    (the `clock` attribute; other arguments are the clock's).

    Args:
        inner: The checkpointing callback (plain or wrapped).
    """

    def __init__(self, inner: Any, every: int, after: int = 0,
                 floor: CopyFloor | None = None):
        super().__init__()
        self.inner = inner
        self.clock = CheckpointClock(every, after, floor)

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_batch_end(self, batch, logs=None):
        self.clock.batch_end(
            lambda: self.inner.on_train_batch_end(batch, logs=logs))

    def on_train_end(self, logs=None):
        self.clock.train_end(lambda: self.inner.on_train_end(logs))


def _forward(hook: str) -> Callable:
    if hook in BATCH_HOOKS + EPOCH_HOOKS:
        def method(self, index, logs=None):
            call_hook(self.inner, hook, (index,), logs)
    else:
        def method(self, logs=None):
            call_hook(self.inner, hook, (), logs)
    method.__name__ = hook
    return method


for _hook in ALL_HOOKS:
    if _hook not in SaveTimer.__dict__:
        setattr(SaveTimer, _hook, _forward(_hook))


def _pending_work(callback: Any) -> Callable[[], None] | None:
    """How to wait for what `callback` still has in flight, if anything."""
    inner = getattr(callback, "inner", callback)  # Through a SaveTimer.
    for name in ("wait", "wait_until_finished"):  # asynccb, Orbax.
        if callable(getattr(inner, name, None)):
            return getattr(inner, name)
    return None


class Window(keras.callbacks.Callback):
    """Marks the measured window: from the end of the warm-up epochs to
    the end of `fit` (which includes waiting for pending saves).

    Warm-up covers what a run pays once: tracing the train step, starting
    worker processes (a TensorFlow import each). At its end the window
    waits until every callback's queued work is done, so that the measured
    part starts from an idle, ready state; the warm-up time is reported on
    its own.

    Its `cpu` counts the CPU seconds of the window (ended by the caller
    once `fit` has returned).

    Args:
        callbacks: The run's callbacks, to wait for.
        warmup_epochs: Epochs not measured.
    """

    def __init__(self, callbacks: Any, warmup_epochs: int = 1):
        super().__init__()
        if not isinstance(callbacks, list):  # One `AsyncCallbackList`.
            callbacks = [callbacks]
        self.waits = [w for w in map(_pending_work, callbacks) if w]
        self.warmup_epochs = warmup_epochs
        self.begin = None
        self.start = None
        self.cpu = CpuWindow()  # `run_once` ends it after `fit` returns.

    def on_train_begin(self, logs=None):
        self.begin = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.warmup_epochs:
            for wait in self.waits:
                wait()
            self.cpu.begin()
            self.start = time.perf_counter()

    @property
    def warmup_s(self) -> float:
        return self.start - self.begin


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# Verification: every checkpoint, whatever its format, is read back as the
# list [model weights..., optimizer variables...] and compared bit for bit
# with plain Keras' `.keras` file of the same step.

def keras_file_arrays(path: str) -> list[np.ndarray]:
    """The arrays of a `.keras` file, in the order Keras stores them."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    arrays: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as handle:
        handle.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                          if isinstance(obj, h5py.Dataset) else None)
    return [arrays[name] for name in sorted(arrays)]


def model_arrays_as_keras_file(model: Any, directory: str) -> list[np.ndarray]:
    """A loaded model's state, saved and read back as a `.keras` file would
    store it (so that any format compares with Keras' own files)."""
    path = os.path.join(directory, "verify-tmp.keras")
    model.save(path)
    try:
        return keras_file_arrays(path)
    finally:
        os.remove(path)


def same_arrays(left: list[np.ndarray], right: list[np.ndarray]) -> bool:
    return len(left) == len(right) and all(
        a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        for a, b in zip(left, right)
    )
