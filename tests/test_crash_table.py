"""The crash table (issue 11, item 5; guarantees 8 and 10): where an
offloaded callback crashes x how it crashes x what the training thread
gets, for the process executor and, where meaningful, the thread and
async executors.

Where (the crashing code reports on a `Signal` gate just before it crashes,
with the moment: the bound is measured from the crash itself):
    set_model  the wrapped callback's `set_model`, the first task of a run
    batch      `on_train_batch_end`
    epoch      `on_epoch_end`
    save       ModelCheckpoint's `model.save`: a layer's `save_own_variables`
               crashes, the checkpoint's temporary file open
    idle       the worker process between hooks, waiting for work: killed
               from outside (SIGKILL, SIGSEGV sent by the test), or a thread
               a hook left there calls `os._exit(3)` once told to
    result     sending a result back: at the end of the run the worker
               pickles the callback's attributes for the training process;
               one of them crashes when pickled

How:
    ValueError   raised
    unpicklable  `NeedsTwoArguments` raised: it pickles, but cannot be
                 unpickled in the training process
    MemoryError  a real one (`bytearray(2**62)`)
    SystemExit   `sys.exit(4)`: an exception that is not an `Exception`
    os._exit     `os._exit(3)`
    SIGKILL      the worker kills itself (idle: the test kills it)
    SIGSEGV      a real segfault, reading address 0 through ctypes (idle:
                 the test sends SIGSEGV)

Expected, every row:
    - exceptions: `fit` raises an `AsyncCallbackError` (not a
      `WorkerDiedError`) whose `__cause__` is the original's type (from a
      worker process, the unpicklable one comes back as the `RemoteError`
      naming it); deaths: a `WorkerDiedError` with the worker's `exitcode`
      and `signal`;
    - raised within 5 s of the crash: training goes on after the crash, so
      the error must come at a next hook, not at the end of a long run
      (failure guards: the run is stopped 6 s after the crash if nothing
      was raised, and an alarm ends a training thread stuck 8 s after it);
    - nothing left: no thread of asynccb, no worker process but the one
      warm worker (a dead one reaped), no shared-memory segment, nothing in
      the checkpoint directory (no temporary `.<name>.asynccb-tmp-...`
      file, and no checkpoint: the crash was at the first save).

Not in the table, not being meaningful:
    - idle x ValueError, unpicklable, MemoryError, SystemExit: nothing of
      the callback runs while its worker is idle; an exception there would
      be raised in no task of asynccb's.
    - thread and async x os._exit, SIGKILL, SIGSEGV: the worker is the
      training process; its death ends training, and the test run.
    - thread and async x idle, result: they have no worker process to die
      while idle, and send nothing back (the callback object is shared).

Rows that differ from the above by design:
    - result x ValueError, unpicklable, MemoryError: nothing is raised. The
      worker sends back each attribute that pickles and skips one that
      does not (an open file, a writer: it stays the training side's), so
      `fit` returns, the attribute that crashed keeps its training-side
      value (here: none), and the others come back. A skip for any reason
      but `TypeError` (Python's "cannot pickle") is logged, with the
      attribute's name and the error.

Rows marked xfail (`BUGS`, each with the bug as its reason) are where
asynccb does not do what the table expects.

Workers are reused across rows: an exception leaves the warm worker
alive; after a death the next process row starts a new one (a TensorFlow
import). Run with `-s` to have the table printed, as markdown, at the end.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import resource
import select
import signal
import threading
import time
from dataclasses import dataclass

import keras
import pytest
from conftest import (JOIN_TIMEOUT_S, kept_segments, mnist_like, shared_segments,
                      worker_processes)
from crossproc import wait_for_exit
from test_process import _model  # The same small model.
from crash_kinds import (DEATHS, EXCEPTIONS, CrashAtBatch, CrashAtEpoch,
                         CrashAtSetModel, CrashingSave, CrashSendingState,
                         CrashWhileIdle, NeedsTwoArguments)

from asynccb import AsyncCallback, AsyncCallbackError, WorkerDiedError
from asynccb._errors import RemoteError

WITHIN_S = 5  # The bound of every row, from the crash to the raise.
# Failure guards, past the bound (a row that reaches them has failed): a
# run still going this long after the crash is stopped (`NotRaised`), a
# training thread stuck ALARM_S after it is interrupted (`Hung`).
GUARD_S = WITHIN_S + 1
ALARM_S = GUARD_S + 2
START_GUARD_S = 120  # Failure guard: a worker's start (TensorFlow import).
# A run that the guards end waits at most this long (asynccb's
# `exit_grace`, 20 s by default) for hooks a broken lane may never run.
EXIT_GRACE_S = 1
MANY_EPOCHS = 100_000  # Training goes on after the crash until stopped.

# What `fit` raises, by how the callback crashed: its type, and its
# `__cause__`'s, or the dead worker's exit code and signal.
OUTCOMES = {
    "ValueError": dict(raised=AsyncCallbackError, cause=ValueError),
    "unpicklable": dict(raised=AsyncCallbackError, cause=NeedsTwoArguments,
                        process_cause=RemoteError),
    "MemoryError": dict(raised=AsyncCallbackError, cause=MemoryError),
    "SystemExit": dict(raised=AsyncCallbackError, cause=SystemExit),
    "os._exit": dict(raised=WorkerDiedError, exitcode=3),
    "SIGKILL": dict(raised=WorkerDiedError, exitcode=-signal.SIGKILL,
                    signal="SIGKILL"),
    "SIGSEGV": dict(raised=WorkerDiedError, exitcode=-signal.SIGSEGV,
                    signal="SIGSEGV"),
}

# Where, with the executors and the ways of crashing meaningful there.
IN_PROCESS = ("thread", "async")
WHERES = {
    "set_model": (IN_PROCESS + ("process",), EXCEPTIONS + DEATHS),
    "batch": (IN_PROCESS + ("process",), EXCEPTIONS + DEATHS),
    "epoch": (IN_PROCESS + ("process",), EXCEPTIONS + DEATHS),
    "save": (IN_PROCESS + ("process",), EXCEPTIONS + DEATHS),
    "idle": (("process",), DEATHS),
    "result": (("process",), EXCEPTIONS + DEATHS),
}

# Sending the callback's state back skips, by design, an attribute whose
# pickling raises an `Exception` (see the module's docstring).
SKIPPED_WHEN_SENT_BACK = ("ValueError", "unpicklable", "MemoryError")

# Rows where asynccb does not do what the table expects: id -> the bug.
BUGS: dict[str, str] = {}


@dataclass(frozen=True)
class Row:
    executor: str
    where: str
    how: str
    raised: type | None  # `None`: `fit` returns.
    cause: type | None = None
    exitcode: int | None = None
    signal: str | None = None

    @property
    def id(self) -> str:
        return f"{self.executor}-{self.where}-{self.how}"

    @property
    def dies(self) -> bool:
        return self.how in DEATHS


def _rows() -> list[Row]:
    rows = []
    for executor in IN_PROCESS + ("process",):
        for where, (executors, hows) in WHERES.items():
            if executor not in executors:
                continue
            for how in hows:
                if executor != "process" and how in DEATHS:
                    continue
                outcome = dict(OUTCOMES[how])
                process_cause = outcome.pop("process_cause", None)
                if executor == "process" and process_cause is not None:
                    outcome["cause"] = process_cause
                if where == "result" and how in SKIPPED_WHEN_SENT_BACK:
                    outcome = dict(raised=None)
                rows.append(Row(executor, where, how, **outcome))
    return rows


ROWS = _rows()


class NotRaised(Exception):
    """Raised by the guard: the run went on long after the crash."""


class Hung(Exception):
    """Raised by the guard's alarm: the training thread is stuck."""


@contextlib.contextmanager
def _alarm(crashed):
    """Failure guard against a hang: raises `Hung` on the (main) training
    thread `START_GUARD_S` after it starts, or, once the crash is reported
    on `crashed`, `ALARM_S` after the crash (a thread of its own watches
    the signal, without reading it)."""

    rung = []

    def ring(signum, frame):
        if not rung:  # Where it hangs, once, on stderr.
            faulthandler.dump_traceback(all_threads=True)
        rung.append(signum)
        # Again in a second if this one is swallowed: raised inside a
        # `__del__` (TensorFlow's), it is only reported as unraisable.
        signal.setitimer(signal.ITIMER_REAL, 1)
        raise Hung("the training thread was stuck")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, START_GUARD_S)
    report = os.open(crashed.path, os.O_RDWR | os.O_NONBLOCK)
    stop_read, stop_write = os.pipe()

    def watch():
        ready, _, _ = select.select([report, stop_read], [], [],
                                    START_GUARD_S)
        if report in ready and stop_read not in ready:
            signal.setitimer(signal.ITIMER_REAL, ALARM_S)

    watcher = threading.Thread(target=watch, name="crash-table-alarm")
    watcher.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.write(stop_write, b"!")
        watcher.join()
        signal.setitimer(signal.ITIMER_REAL, 0)  # The watcher may arm it.
        signal.signal(signal.SIGALRM, previous)
        for fd in (report, stop_read, stop_write):
            os.close(fd)


class Witness(keras.callbacks.Callback):
    """On the training thread, after the offloaded callback in the list: at
    the crash's hook it waits for the crash (`await_crash`), then lets
    training go on; `GUARD_S` after the crash it stops the run."""

    def __init__(self, hook, await_crash):
        super().__init__()
        self.hook, self.await_crash = hook, await_crash
        self.crash_at: float | None = None
        self.hooks_after = 0

    def _seen(self, hook):
        if self.crash_at is None:
            if hook == self.hook:
                self.crash_at = self.await_crash()
            return
        self.hooks_after += 1
        if time.monotonic() - self.crash_at > GUARD_S:
            raise NotRaised(f"nothing raised {GUARD_S} s after the crash, "
                            f"{self.hooks_after} hooks later")

    def on_train_begin(self, logs=None):
        self._seen("on_train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self._seen("on_epoch_begin")

    def on_epoch_end(self, epoch, logs=None):
        self._seen("on_epoch_end")

    def on_train_batch_begin(self, batch, logs=None):
        self._seen("on_train_batch_begin")

    def on_train_batch_end(self, batch, logs=None):
        self._seen("on_train_batch_end")


def _crash(crashed) -> tuple[int, float] | None:
    """The crash's (pid, monotonic time), reported on `crashed`."""
    payload = crashed.wait(0)
    if payload is None:
        return None
    pid, at = payload.decode().split()
    return int(pid), float(at)


def _awaiting(crashed):
    def await_crash() -> float:
        found = crashed.wait(START_GUARD_S)
        assert found is not None, "the callback never crashed"
        return _crash(crashed)[1]

    return await_crash


def _killing_idle(how, wrapper, started, gate, crashed):
    """Kills the worker once it is idle (or tells it to exit)."""

    def await_crash() -> float:
        payload = started.wait(START_GUARD_S)
        assert payload is not None, "the worker never ran on_train_begin"
        pid = int(payload)
        wrapper.wait()  # The worker has nothing left to do.
        if how == "os._exit":
            gate.set()  # Its thread reports, then exits.
            assert crashed.wait(JOIN_TIMEOUT_S) is not None
        else:
            resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0))
            crashed.set(f"{pid} {time.monotonic()!r}".encode())
            os.kill(pid, getattr(signal, how))
        return _crash(crashed)[1]

    return await_crash


def _is_zombie_of_ours(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] == "Z" and int(fields[1]) == os.getpid()


def _leftovers(threads_before, directory, dead_pid) -> list[str]:
    """What the run left: asynccb's threads (waited for, as the autouse
    fixture does), worker processes but the warm one, the dead worker
    unreaped, shared memory segments, files in the checkpoint directory."""
    threads = [t for t in threading.enumerate() if t not in threads_before
               and not t.name.startswith("asynccb-pool")]
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    left = [f"thread {t.name}" for t in threads if t.is_alive()]
    workers = worker_processes()
    if len(workers) > 1:
        left.append(f"{len(workers)} worker processes")
    if dead_pid is not None and _is_zombie_of_ours(dead_pid):
        left.append(f"the dead worker {dead_pid}, unreaped")
    left += [f"segment {name}" for name in shared_segments()
             if name not in kept_segments()]
    left += [f"file {path.name}" for path in sorted(directory.iterdir())]
    return left


def _raised(error) -> str:
    if error is None:
        return "nothing"
    if isinstance(error, Hung):
        return "nothing: stuck (Hung)"
    if isinstance(error.__context__, (Hung, NotRaised)):
        return (f"bare {type(error).__name__}, once the guard's "
                f"{type(error.__context__).__name__} ended the run")
    text = type(error).__name__
    if isinstance(error, WorkerDiedError):
        return f"{text} (exit {error.exitcode}, {error.signal})"
    cause = error.__cause__
    if isinstance(cause, RemoteError):
        return f"{text} from RemoteError({cause.type_name.split('.')[-1]})"
    if cause is not None and isinstance(error, AsyncCallbackError):
        return f"{text} from {type(cause).__name__}"
    return text


@pytest.fixture(scope="module")
def crash_table():
    """The rows as they ran; printed as markdown at the end (with `-s`)."""
    rows: list[dict] = []
    yield rows
    lines = ["| where | how | executor | raised | within s | left |",
             "|---|---|---|---|---|---|"]
    for ran in rows:
        within = "" if ran["within"] is None else f"{ran['within']:.2f}"
        lines.append(f"| {ran['where']} | {ran['how']} | {ran['executor']} "
                     f"| {ran['raised']} | {within} | {ran['left']} |")
    print("\n\nCrash table\n\n" + "\n".join(lines))


def _param(row: Row):
    marks = ()
    if row.id in BUGS:
        marks = (pytest.mark.xfail(strict=True, reason=BUGS[row.id]),)
    return pytest.param(row, id=row.id, marks=marks)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_crash(row, tmp_path, signals, crash_table, caplog):
    crashed, during = signals("crashed"), signals("during")
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    trainer = os.getpid()
    model = _model(CrashingSave(row.how if row.where == "save" else None,
                                crashed.path, trainer, str(directory),
                                during.path))
    epochs = MANY_EPOCHS
    options = dict(executor=row.executor, state="none",
                   exit_grace=EXIT_GRACE_S)
    if row.where == "save":
        callback = keras.callbacks.ModelCheckpoint(
            str(directory / "model.keras"))
        options.pop("state")
    elif row.where == "idle":
        started, gate = signals("started"), signals("gate")
        callback = CrashWhileIdle(row.how, crashed.path, trainer,
                                  started.path, gate.path)
    else:
        kind = {"set_model": CrashAtSetModel, "batch": CrashAtBatch,
                "epoch": CrashAtEpoch, "result": CrashSendingState}
        callback = kind[row.where](row.how, crashed.path, trainer)
    wrapper = AsyncCallback(callback, **options)
    threads_before = set(threading.enumerate())
    x, y = mnist_like(64)
    error = None
    # The earlier tests' garbage (TensorFlow functions, whose finalizers
    # are slow) is collected now, not in the timed window on this thread.
    gc.collect()
    with _alarm(crashed):
        callbacks = [wrapper]
        if row.where == "result":
            epochs = 2  # The crash comes as the run ends.
        else:
            hook = {"set_model": "on_train_begin",
                    "batch": "on_train_batch_end", "epoch": "on_epoch_end",
                    "save": "on_epoch_end", "idle": "on_epoch_begin"}
            await_crash = (
                _killing_idle(row.how, wrapper, started, gate, crashed)
                if row.where == "idle" else _awaiting(crashed))
            callbacks.append(Witness(hook[row.where], await_crash))
        try:
            model.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
                      callbacks=callbacks)
        except (Exception, SystemExit) as exc:
            error = exc
        raised_at = time.monotonic()
    crash = _crash(crashed)
    if isinstance(error, Hung) and row.executor == "process" and crash:
        # Free what waits for the stuck worker, for the rows after this.
        os.kill(crash[0], signal.SIGKILL)
        assert wait_for_exit(crash[0], JOIN_TIMEOUT_S)
    within = (raised_at - crash[1]
              if error is not None and crash is not None else None)
    dead = crash[0] if crash is not None and row.dies else None
    left = _leftovers(threads_before, directory, dead)
    raised = _raised(error)
    if error is None and row.where == "result":
        raised = "nothing; the attribute stayed behind"
    crash_table.append(dict(where=row.where, how=row.how,
                            executor=row.executor, raised=raised,
                            within=within, left=", ".join(left) or "nothing"))

    assert crash is not None, f"it never crashed; raised {error!r}"
    if row.where == "save":  # Its temporary file was there at the crash.
        assert any(name.startswith(".model.asynccb-tmp-") for name in
                   during.wait(0).decode().split()), during.wait(0)
    if row.raised is None:
        assert error is None, f"raised {error!r}"
        # The attribute that crashed stayed behind; the others came back.
        assert callback.seen == [0, 1]
        assert not hasattr(callback, "result")
        assert any("CrashSendingState.result stays as it was" in message
                   for message in caplog.messages), caplog.messages
    else:
        assert error is not None, "fit returned"
        assert type(error) is row.raised, repr(error)
        if row.dies:
            assert (error.exitcode, error.signal) == (row.exitcode,
                                                      row.signal)
            assert crash[0] != trainer
        else:
            assert isinstance(error.__cause__, row.cause), repr(
                error.__cause__)
            if row.cause is RemoteError:
                assert error.__cause__.type_name == (
                    "crash_kinds.NeedsTwoArguments")
        assert within <= WITHIN_S
    if row.executor == "process":
        # An exception leaves the warm worker that ran it alive.
        alive = [pid for pid, _ in worker_processes()]
        assert (crash[0] in alive) != row.dies, (crash[0], alive)
    assert not left
