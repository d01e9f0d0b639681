"""The wire protocol between a training process and its worker process.

Every message is a small frozen dataclass sent with plain `pickle`, whose
fields are plain data: names, numbers, bytes. What may not load in the
other process (a task holding user objects, a blueprint naming user
classes, the callback, an exception, a callback attribute) travels as
bytes that the sender pickled and the receiver loads where a failure is
reported, so a message itself always arrives.

A worker serves many lanes (one per offloaded callback), each on a thread
of its own; every message about a lane carries its number.

Training process to worker:
    Init         first, and whenever it changes: where to import from
    Open         a lane: its thread, runner and buffer mappings
    Blueprint    a lane's shadow model source, when it changes
    RunTask      one task of a lane (with the callback at `set_model`)
    Finish       reply with a lane's callback state (end of a run)
    Close        a lane is gone (its callback was dropped)
    Stop         exit

Worker to training process:
    Ready        after `Init`
    Done         a lane's task ran: its control effects
    Failed       a lane's task failed: an `ExceptionReport`
    State        a lane's callback attributes, each pickled on its own

This module imports neither TensorFlow nor Keras: a worker loads it before
it sets itself up, and its unit tests run without them.
"""

from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "Init",
    "Open",
    "Blueprint",
    "RunTask",
    "Finish",
    "Close",
    "Stop",
    "Ready",
    "Done",
    "Failed",
    "State",
    "ExceptionReport",
    "SnapshotRef",
    "USE_BLUEPRINT",
    "encode",
    "decode",
]

USE_BLUEPRINT = "<current blueprint>"
"""A task's `model` on the wire: the last `Blueprint` sent."""


@dataclass(frozen=True)
class Init:
    sys_path: tuple[str, ...]


@dataclass(frozen=True)
class Open:
    lane: int
    deferred_control: bool
    capacity: int  # How many snapshot buffers it may keep mapped.


@dataclass(frozen=True)
class Blueprint:
    lane: int
    data: bytes  # The cloudpickled `ModelBlueprint`.


@dataclass(frozen=True)
class RunTask:
    lane: int
    task: bytes  # The cloudpickled `Task`, its snapshot a `SnapshotRef`.
    callback: bytes | None = None  # The cloudpickled callback, at setup.


@dataclass(frozen=True)
class Finish:
    lane: int


@dataclass(frozen=True)
class Close:
    lane: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class Done:
    lane: int
    effects: dict[str, Any] = field(default_factory=dict)


def _qualified_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as str_exc:  # The user's `__str__` itself failed.
        return f"<str() raised {type(str_exc).__name__}: {str_exc}>"


@dataclass(frozen=True)
class ExceptionReport:
    """An exception raised in the worker, as data that always crosses: the
    exception pickled (or `None` if it cannot be), its type's name, its
    message and its formatted traceback (which does not pickle).

    Attributes:
        data: The pickled exception, or `None`.
        type_name: Its type, qualified by its module.
        message: Its `str()`.
        traceback: Its formatted traceback, from the worker.
    """

    data: bytes | None
    type_name: str
    message: str
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> "ExceptionReport":
        text = "".join(traceback.format_exception(type(exc), exc,
                                                  exc.__traceback__))
        try:
            data = pickle.dumps(exc)
        except Exception:  # Rebuilt as a `RemoteError` from the rest.
            data = None
        return cls(data, _qualified_name(type(exc)), _message(exc), text)

    def rebuild(self) -> BaseException:
        """The exception, with the worker's traceback as a
        `RemoteTraceback` cause (as `concurrent.futures` does); a
        `RemoteError` holding its type name, message and traceback if it
        cannot be rebuilt here."""
        from asynccb._errors import RemoteError, RemoteTraceback

        if self.data is None:
            return RemoteError(self.type_name, self.message, self.traceback,
                               "it could not be pickled in the worker")
        try:
            exc = pickle.loads(self.data)
        except Exception as load_exc:
            return RemoteError(
                self.type_name, self.message, self.traceback,
                "it could not be rebuilt in the training process: "
                f"{type(load_exc).__name__}: {load_exc}")
        exc.__cause__ = RemoteTraceback(self.traceback)
        return exc


@dataclass(frozen=True)
class Failed:
    lane: int
    error: ExceptionReport


@dataclass(frozen=True)
class State:
    lane: int
    attributes: dict[str, bytes]  # Each pickled on its own.
    skipped: dict[str, str]  # Name -> why it did not pickle.


ToWorker = Union[Init, Open, Blueprint, RunTask, Finish, Close, Stop]
FromWorker = Union[Ready, Done, Failed, State]


def encode(message: ToWorker | FromWorker) -> bytes:
    return pickle.dumps(message)


def decode(data: bytes) -> ToWorker | FromWorker:
    return pickle.loads(data)


@dataclass
class SnapshotRef:
    """A snapshot as a worker process sees it: a shared buffer by name.

    Has what `Shadow.apply` reads of a `Snapshot`; `data` is mapped in the
    worker and never travels.
    """

    name: str | None  # None for an empty layout (no buffer).
    layout: Any  # LayoutSpec; None for the lane's last one (sent once).
    stop_training: bool
    serial: int  # `Snapshot.serial`.
    data: Any = None

    @property
    def level(self) -> Any:
        return self.layout.level

    def arrays(self) -> list:
        return self.layout.views(self.data)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "data": None}
