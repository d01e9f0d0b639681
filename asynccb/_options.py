"""The offloading options shared by `AsyncCallback` and `AsyncCallbackList`,
and the argument checks both use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from asynccb._channel import POLICIES
from asynccb._executors import get_executor

__all__ = [
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_SNAPSHOTS",
    "Options",
    "check_callback",
    "check_choice",
    "check_positive_int",
    "check_bool",
    "check_seconds",
]

DEFAULT_MAX_PENDING = 16
DEFAULT_MAX_SNAPSHOTS = 2
DEFAULT_EXIT_GRACE = 20.0
"""Seconds to finish accepted hooks when a run ends early. Schedulers give
a preempted job about 30 s between SIGTERM and SIGKILL (Kubernetes' and
Slurm's defaults, cloud spot VMs): this leaves the rest for the process to
end and the list of what was not done to reach stderr."""


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Returns `value` if it is one of `choices`.

    Raises:
        ValueError: Naming `name`, the choices and the value received.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_positive_int(name: str, value: Any) -> int:
    # `True` is an int to Python, never a queue bound to a user.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value


def check_seconds(name: str, value: Any) -> float:
    """Returns `value` if it is a finite number of seconds, zero or more."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        0 <= value < float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a number of seconds, zero or more. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def check_callback(name: str, value: Any) -> Any:
    """Returns `value` if it is a `keras.callbacks.Callback`.

    Raises:
        TypeError: Naming `name` and the value received.
    """
    # Imported here, so that `Options` loads without TensorFlow; whoever
    # checks a callback has Keras loaded already.
    import keras

    if not isinstance(value, keras.callbacks.Callback):
        raise TypeError(
            f"`{name}` must be a `keras.callbacks.Callback` instance. "
            f"Received: {name}={value!r} (of type {type(value).__name__})"
        )
    return value


@dataclass(frozen=True)
class Options:
    """How offloaded callbacks run: checked once, here, when made.

    `AsyncCallback` and `AsyncCallbackList` take these as keyword arguments
    and build one `Options` from them; a list hands its `Options` to the
    `AsyncCallback`s it makes, which then need no checks of their own. It is
    frozen so that what was checked is what is used.

    Args:
        executor: `"thread"`, `"process"` or `"async"`; `None` for each
            callback's default (see `asynccb._roles.default_executor`).
        max_pending: The most hooks that may wait in a callback's queue.
        on_full: The full-queue policy: `"block"`, `"drop_oldest"` or
            `"latest"`.
        max_snapshots: The most snapshot buffers alive at once.
        fast_saves: Whether checkpoint saves after a model's first may be
            written straight from the snapshot into the file layout learned
            from Keras' first save (see `asynccb._fast_saves`).
        exit_grace: The most seconds spent finishing accepted hooks when a
            run ends early (SIGTERM, an exception, `sys.exit`, Ctrl-C, a
            run left open whose callbacks are dropped or whose interpreter
            exits); what is left then is listed on stderr.
        handle_sigterm: Whether a SIGTERM during a run (installed from the
            main thread) first finishes the accepted hooks.

    Raises:
        ValueError: If a value is not one of its choices, or not a positive
            integer; the message names the argument and the value received.
    """

    executor: str | None = None
    max_pending: int = DEFAULT_MAX_PENDING
    on_full: str = "block"
    max_snapshots: int = DEFAULT_MAX_SNAPSHOTS
    fast_saves: bool = True
    exit_grace: float = DEFAULT_EXIT_GRACE
    handle_sigterm: bool = True

    def __post_init__(self) -> None:
        if self.executor is not None:
            get_executor(self.executor)  # Raises, naming the choices.
        check_positive_int("max_pending", self.max_pending)
        check_choice("on_full", self.on_full, POLICIES)
        check_positive_int("max_snapshots", self.max_snapshots)
        check_bool("fast_saves", self.fast_saves)
        check_seconds("exit_grace", self.exit_grace)
        check_bool("handle_sigterm", self.handle_sigterm)
