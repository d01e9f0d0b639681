"""What crashes in the crash table (`test_crash_table.py`), and how.

Everything here runs where asynccb runs a callback: a worker thread, an
anyio lane, or a worker process (which imports this module by name: the
tests' directory is on the `sys.path` it is given). The crashing code
reports on a `crossproc.Signal` just before it crashes, with its pid and
the moment (`time.monotonic()`, one clock for every process of the
machine), so the table measures from the crash itself.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
import threading
import time

import keras
from conftest import JOIN_TIMEOUT_S
from crossproc import Signal
from gated import Gain

__all__ = [
    "DEATHS", "EXCEPTIONS", "NeedsTwoArguments", "crash", "report",
    "CrashingSave", "CrashAtSetModel", "CrashAtBatch", "CrashAtEpoch",
    "CrashWhileIdle", "CrashSendingState", "PicklesBadly",
]

# The ways to crash: an exception, then the ways to die.
EXCEPTIONS = ("ValueError", "unpicklable", "MemoryError", "SystemExit")
DEATHS = ("os._exit", "SIGKILL", "SIGSEGV")


class NeedsTwoArguments(Exception):
    """Pickles (as its one `args` item) but cannot be unpickled: its
    `__init__` wants two arguments (as in test_process_errors)."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


def report(crashed: str) -> None:
    """Says on the signal at path `crashed`: `<pid> <monotonic time>`."""
    Signal.attach(crashed).set(f"{os.getpid()} {time.monotonic()!r}".encode())


def crash(how: str, crashed: str, trainer_pid: int) -> None:
    """Reports on `crashed`, then crashes this way (see EXCEPTIONS, DEATHS).

    A death asked for in the training process (`trainer_pid`: the test's
    own, where a death would end the test run) raises instead.
    """
    if how in DEATHS:
        if os.getpid() == trainer_pid:
            raise AssertionError(f"{how} asked for in the training process")
        # A dying worker leaves no core file, wherever the test runs.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    report(crashed)
    if how == "ValueError":
        raise ValueError("crash table: ValueError")
    if how == "unpicklable":
        raise NeedsTwoArguments("crash table", "the crash")
    if how == "MemoryError":
        # A real one: no allocator hands out 2**62 bytes.
        bytearray(1 << 62)
        raise AssertionError("allocated 2**62 bytes")
    if how == "SystemExit":  # A BaseException, not an Exception.
        sys.exit(4)
    if how == "os._exit":
        os._exit(3)
    if how == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "SIGSEGV":
        ctypes.string_at(0)  # A real segfault: reads address 0.
    else:
        raise AssertionError(f"unknown crash {how!r}")
    raise AssertionError(f"still alive after {how}")


class CrashingSave(Gain):
    """Crashes (`how`) in its first `save_own_variables`: mid-save, the
    checkpoint's temporary file open. `how=None`: an ordinary layer.

    Just before, it says on the signal at path `during` which files the
    checkpoint directory `directory` holds (the temporary file, so that
    the table's "nothing left" is not vacuous).

    Not registered with Keras: a worker process gets it from this module.
    """

    def __init__(self, how=None, crashed=None, trainer_pid=0,
                 directory=None, during=None, **kwargs):
        super().__init__(**kwargs)
        self.how, self.crashed, self.trainer_pid = how, crashed, trainer_pid
        self.directory, self.during = directory, during

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.how is not None:
            files = "\n".join(sorted(os.listdir(self.directory)))
            Signal.attach(self.during).set(files.encode() or b"\n")
            crash(self.how, self.crashed, self.trainer_pid)

    def get_config(self):
        return {**super().get_config(), "how": self.how,
                "crashed": self.crashed, "trainer_pid": self.trainer_pid,
                "directory": self.directory, "during": self.during}


class _Crashes(keras.callbacks.Callback):
    """A callback that crashes `how` at one place (a subclass each, so
    that each offloads only the hooks it has)."""

    def __init__(self, how: str, crashed: str, trainer_pid: int):
        super().__init__()
        self.how, self.crashed, self.trainer_pid = how, crashed, trainer_pid

    def crash(self) -> None:
        crash(self.how, self.crashed, self.trainer_pid)


class CrashAtSetModel(_Crashes):
    def set_model(self, model):
        super().set_model(model)
        self.crash()


class CrashAtBatch(_Crashes):
    def on_train_batch_end(self, batch, logs=None):
        self.crash()


class CrashAtEpoch(_Crashes):
    def on_epoch_end(self, epoch, logs=None):
        self.crash()


class CrashWhileIdle(_Crashes):
    """Reports its worker's pid on `started` in `on_train_begin`, its only
    hook. Killed from outside (SIGKILL, SIGSEGV) while idle after it; for
    `os._exit`, it leaves a thread in its worker that exits once `gate`
    opens, the worker idle."""

    def __init__(self, how, crashed, trainer_pid, started, gate):
        super().__init__(how, crashed, trainer_pid)
        self.started, self.gate = started, gate

    def on_train_begin(self, logs=None):
        if self.how == "os._exit":
            threading.Thread(target=self._exit_when_told, daemon=True,
                             name="crash-table-exit").start()
        Signal.attach(self.started).set(str(os.getpid()).encode())

    def _exit_when_told(self) -> None:
        if Signal.attach(self.gate).wait(JOIN_TIMEOUT_S):  # Guard only.
            self.crash()


class PicklesBadly:
    """Crashes `how` when pickled in a worker process (and pickles as
    `None` anywhere else)."""

    def __init__(self, how: str, crashed: str, trainer_pid: int):
        self.how, self.crashed, self.trainer_pid = how, crashed, trainer_pid

    def __reduce__(self):
        if os.getpid() != self.trainer_pid:
            crash(self.how, self.crashed, self.trainer_pid)
        return (type(None), ())


class CrashSendingState(_Crashes):
    """At the end of the run its worker sends back its attributes: `seen`
    (the epochs it saw) travels, `result` crashes when pickled."""

    def on_epoch_end(self, epoch, logs=None):
        self.seen = [*getattr(self, "seen", []), epoch]

    def on_train_end(self, logs=None):
        self.result = PicklesBadly(self.how, self.crashed, self.trainer_pid)
