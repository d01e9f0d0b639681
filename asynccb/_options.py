"""Argument checks shared by `AsyncCallback` and `AsyncCallbackList`."""

from __future__ import annotations

from typing import Any

import keras

from asynccb._channel import POLICIES
from asynccb._executors import EXECUTORS

__all__ = ["EXECUTORS", "check_callback", "check_choice", "check_positive_int"]


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, choices))}. "
            f"Received: {name}={value!r}"
        )
    return value


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"`{name}` must be a positive integer. Received: {name}={value!r}"
        )
    return value


def check_callback(name: str, value: Any) -> Any:
    if not isinstance(value, keras.callbacks.Callback):
        raise TypeError(
            f"`{name}` must be a `keras.callbacks.Callback` instance. "
            f"Received: {name}={value!r} (of type {type(value).__name__})"
        )
    return value


def check_policy(value: Any) -> str:
    return check_choice("on_full", value, POLICIES)
