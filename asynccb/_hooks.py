"""The Keras callback hooks: names, calling convention, and log copies."""

from __future__ import annotations

import copy
from typing import Any

import keras
import numpy as np

# Hooks that take `(batch, logs=logs)`; Keras' `CallbackList` passes `logs`
# by keyword to these and positionally to all others, and so do we.
BATCH_HOOKS = (
    "on_batch_begin",
    "on_batch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_batch_begin",
    "on_predict_batch_end",
)
EPOCH_HOOKS = ("on_epoch_begin", "on_epoch_end")
BEGIN_HOOKS = ("on_train_begin", "on_test_begin", "on_predict_begin")
END_HOOKS = ("on_train_end", "on_test_end", "on_predict_end")
ALL_HOOKS = BATCH_HOOKS + EPOCH_HOOKS + BEGIN_HOOKS + END_HOOKS

# Keras' default `on_train_batch_*` forward to the legacy `on_batch_*`
# aliases, so a callback that overrides only the alias still acts there.
_ALIASED_BY = {
    "on_train_batch_begin": "on_batch_begin",
    "on_train_batch_end": "on_batch_end",
}


def is_keras_default(method: Any) -> bool:
    """Whether `method` is the no-op that `keras.callbacks.Callback` defines.

    Keras marks its no-op hooks with `_is_default` (see
    `keras.src.utils.python_utils.default`); it uses the same mark to skip
    callbacks in its own async dispatch.
    """
    return getattr(method, "_is_default", False)


def effective_hooks(callback: Any) -> frozenset[str]:
    """The hooks of `callback` that do something when called.

    Args:
        callback: A `keras.callbacks.Callback`.

    Returns:
        The names of the hooks that are not Keras' no-op defaults, counting a
        default `on_train_batch_*` as effective when its legacy alias is
        overridden.
    """
    hooks = set()
    for name in ALL_HOOKS:
        if not is_keras_default(getattr(callback, name)):
            hooks.add(name)
        elif name in _ALIASED_BY and not is_keras_default(
            getattr(callback, _ALIASED_BY[name])
        ):
            hooks.add(name)
    return frozenset(hooks)


def call_hook(callback: Any, hook: str, args: tuple, logs: Any) -> Any:
    """Calls `callback.<hook>` the way Keras' `CallbackList` does."""
    method = getattr(callback, hook)
    if hook in BATCH_HOOKS:
        return method(*args, logs=logs)
    return method(*args, logs)


def copy_logs(logs: Any) -> Any:
    """A private copy of `logs` for a hook that runs later, elsewhere.

    Keras hands every callback of a hook the same `logs` dict, and
    synchronous callbacks may change it after an offloaded one was
    dispatched (ReduceLROnPlateau adds `learning_rate`): the offloaded hook
    must see the dict as it was at its turn.
    """
    if logs is None:
        return None
    if isinstance(logs, dict):
        return {key: copy_logs(value) for key, value in logs.items()}
    if isinstance(logs, (list, tuple)):
        return type(logs)(copy_logs(value) for value in logs)
    if isinstance(logs, (float, int, str, bool)):
        return logs
    if isinstance(logs, np.ndarray):
        return logs.copy()
    if keras.ops.is_tensor(logs):
        return logs  # Tensors are immutable: sharing one is a copy.
    return copy.deepcopy(logs)


def describe_call(hook: str, args: tuple) -> str:
    """A short description of a hook call, e.g. `on_epoch_end(epoch=3)`."""
    if not args:
        return f"{hook}()"
    if hook in BATCH_HOOKS:
        return f"{hook}(batch={args[0]})"
    if hook in EPOCH_HOOKS:
        return f"{hook}(epoch={args[0]})"
    return f"{hook}{args!r}"
