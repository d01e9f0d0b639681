"""Every exception asynccb raises, each saying who raises it and when.

The public ones show as `asynccb.<Name>` in tracebacks (and pickle by that
name): users catch them by the names they import.
"""

from __future__ import annotations

__all__ = [
    "AsyncCallbackError",
    "WorkerDiedError",
    "ControlFromWorkerError",
    "RemoteTraceback",
    "RemoteError",
]

_base_cause = BaseException.__dict__["__cause__"]


class AsyncCallbackError(RuntimeError):
    """Raised on the training thread when an offloaded callback hook failed.

    The original exception, with the traceback of the worker that ran the
    hook, is this exception's `__cause__`.

    Keras' `fit` re-raises exceptions `from None` to shorten tracebacks,
    which would erase that link; this class keeps the original and answers
    `__cause__` with it, so `err.__cause__`, pytest, IPython and the
    `traceback` module show the worker's traceback. (Python 3.12 and older
    print uncaught exceptions in C, which reads the erased link: there,
    print `traceback.format_exception(err)`, or call
    `keras.config.disable_traceback_filtering()`.)

    Attributes:
        callback_name: Name of the callback whose hook failed.
        hook: The hook (or model method) call that failed.
        pending: Descriptions of the hooks that were still queued for that
            callback and were cancelled because of the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        callback_name: str = "",
        hook: str = "",
        pending: tuple[str, ...] = (),
        original: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.callback_name = callback_name
        self.hook = hook
        self.pending = pending
        self._original = original

    @property
    def __cause__(self) -> BaseException | None:
        return _base_cause.__get__(self) or self._original

    @__cause__.setter
    def __cause__(self, value: BaseException | None) -> None:
        _base_cause.__set__(self, value)


class WorkerDiedError(AsyncCallbackError):
    """Raised on the training thread when a worker process died.

    Killed (SIGKILL, the out-of-memory killer), crashed (a segfault), or
    exited: its death is noticed through its process sentinel, at once.

    Attributes:
        exitcode: The worker's exit code; negative for a signal, as in
            `multiprocessing.Process.exitcode`.
        signal: The name of the signal that killed it, or `None`.
    """

    def __init__(self, message: str, *, exitcode: int | None = None,
                 **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.exitcode = exitcode
        self.signal = _signal_name(exitcode)


class ControlFromWorkerError(RuntimeError):
    """Raised in a worker (and reaches the training thread as the cause of
    an `AsyncCallbackError`) when an offloaded hook sets
    `model.stop_training` or changes the learning rate on its shadow model
    and the callback was not wrapped with `deferred_control=True`: there it
    would have no effect on training."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process,
    attached as that exception's `__cause__` (as `concurrent.futures`
    does), since tracebacks do not cross processes."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


class RemoteError(Exception):
    """Stands in for an exception raised in a worker process that cannot be
    rebuilt in the training process (its class does not pickle, or does not
    unpickle here: an `__init__` with other arguments than its `args`, a
    module that does not import here).

    Its text holds what is known of the original: the type's name, the
    message and the worker's traceback.

    Attributes:
        type_name: The original exception's type, qualified by its module.
        message: The original exception's `str()`.
        traceback: The worker's formatted traceback.
        reason: Why the original could not be rebuilt.
    """

    def __init__(self, type_name: str, message: str, traceback: str,
                 reason: str = "") -> None:
        super().__init__(type_name, message, traceback, reason)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.reason = reason

    def __str__(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return (f"{self.type_name}: {self.message}{why}\n"
                f"Traceback in the worker:\n{self.traceback}")


def _signal_name(exitcode: int | None) -> str | None:
    if exitcode is None or exitcode >= 0:
        return None
    import signal

    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"


for _public in (AsyncCallbackError, WorkerDiedError, ControlFromWorkerError):
    _public.__module__ = "asynccb"


class CannotCopySave(Exception):
    """Raised inside asynccb (never to users) when a save cannot take the
    copying path: the model's file holds something asynccb cannot prove it
    writes as Keras does. The message is the reason `stats()` reports; the
    save goes through Keras' own writer instead."""
