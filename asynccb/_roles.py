"""What asynccb knows about callbacks: which control training, which are
slow, and what model state each hook needs."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import keras

from asynccb._hooks import ALL_HOOKS, effective_hooks
from asynccb._snapshot import StateLevel

__all__ = [
    "StateSpec",
    "is_control",
    "default_executor",
    "is_known_slow",
    "offloads_saves",
    "saver_kind",
    "waits_for_saves",
    "on_every_worker",
    "inline_on_every_worker",
    "uses_model",
    "state_planner",
    "model_changing_hooks",
    "quiet_hooks",
    "setup_state",
]

_cb = keras.callbacks

# Callbacks that steer training (stop it, change the learning rate or the
# weights) or that Keras itself relies on inline (History feeds
# `model.history`, the progress bar prints in step).
CONTROL_TYPES = tuple(
    getattr(_cb, name)
    for name in (
        "EarlyStopping",
        "ReduceLROnPlateau",
        "LearningRateScheduler",
        "TerminateOnNaN",
        "SwapEMAWeights",
        "History",
        "ProgbarLogger",
    )
    if hasattr(_cb, name)
)

# Built-ins whose hooks do slow I/O and never steer training in a worker
# (BackupAndRestore's restore stays inline: see `offloads_saves`).
SLOW_TYPES = (_cb.ModelCheckpoint, _cb.BackupAndRestore, _cb.CSVLogger,
              _cb.TensorBoard, _cb.RemoteMonitor)

# Callbacks of which only the saves are offloaded (see `offloads_saves`).
_SAVES_ONLY_TYPES = (_cb.ModelCheckpoint, _cb.BackupAndRestore)

# Synchronous callbacks known not to change the model's variables, so a
# snapshot taken before them is still valid after them.
_READ_ONLY_TYPES = (
    _cb.History,
    _cb.ProgbarLogger,
    _cb.TerminateOnNaN,
    _cb.CSVLogger,
    _cb.RemoteMonitor,
    _cb.TensorBoard,
    _cb.ModelCheckpoint,
)

StateSpec = Union[
    str,
    StateLevel,
    Mapping[str, Union[str, StateLevel]],
    Callable[[str, tuple], Union[str, StateLevel]],
]
"""How a callback declares the model state its hooks need.

A level name for every hook it implements (`"none"`, `"scalars"`,
`"weights"`, `"full"`); a mapping from hook name to level (hooks not listed
need none); or a function of `(hook, args)` returning a level.
"""


def is_control(callback: Any) -> bool:
    """Whether `callback` must run on the training thread.

    True for the built-ins that steer training and for any callback that
    declares itself with a true `asynccb_control` attribute.
    """
    return isinstance(callback, CONTROL_TYPES) or bool(
        getattr(callback, "asynccb_control", False)
    )


def is_known_slow(callback: Any) -> bool:
    """Whether `callback` is a built-in that `offload="auto"` moves off."""
    return isinstance(callback, SLOW_TYPES) and not is_control(callback)


def offloads_saves(callback: Any) -> bool:
    """Whether only `callback`'s model saves are offloaded.

    A ModelCheckpoint decides on the training thread (a counter, a metric
    comparison, a file name: microseconds, and its state stays on the
    user's object) and only its `model.save` runs in the worker, on a
    snapshot: exactly the slow part, and a dropped save is simply a skipped
    file. A BackupAndRestore likewise: its counters and its restore (into
    the live model, at `on_train_begin`) stay on the training thread; each
    backup goes to the worker as one task (see `asynccb._backups`).
    """
    return isinstance(callback, _SAVES_ONLY_TYPES)


def saver_kind(callback: Any) -> str:
    """What `callback` saves, as far as the file's layout goes: its class,
    and for a ModelCheckpoint whether it saves weights only (two of them
    on one model write different files)."""
    kind = type(callback).__qualname__
    if isinstance(callback, _cb.ModelCheckpoint):
        kind += "(weights)" if callback.save_weights_only else "(model)"
    return kind


def waits_for_saves(callback: Any) -> frozenset[str]:
    """The hooks of a saves-only callback that read or remove what its
    saves write, and so run only once its queued saves are written:
    BackupAndRestore restores from its backup at `on_train_begin` and
    removes it at `on_train_end`."""
    if isinstance(callback, _cb.BackupAndRestore):
        return frozenset({"on_train_begin", "on_train_end"})
    return frozenset()


def on_every_worker(callback: Any) -> bool:
    """Whether an offloaded `callback` runs on every worker of a cluster,
    not only on the chief: declared with a true `asynccb_every_worker`
    attribute (a callback whose work each worker needs, e.g. writing
    worker-local files)."""
    return bool(getattr(callback, "asynccb_every_worker", False))


def inline_on_every_worker(callback: Any) -> frozenset[str]:
    """The hooks of an offloaded callback that run inline on the workers
    other than the chief too: BackupAndRestore's restore, which every
    worker needs to resume in step (its backups are the chief's)."""
    if isinstance(callback, _cb.BackupAndRestore):
        return frozenset({"on_train_begin"})
    return frozenset()


def default_executor(callback: Any) -> str:
    """The executor a callback gets when none is named.

    From the benchmark (benchmarks/heavy_checkpointing.py, see the README):
    a checkpoint save is seconds of CPU-bound Python (HDF5, zip) per
    gigabyte that, in a thread, holds the GIL against the training thread,
    so ModelCheckpoint runs in a worker process. Everything else defaults
    to a thread: CSV rows, TensorBoard scalars and uploads are light or
    I/O-bound, and a process costs a TensorFlow import and its memory.
    """
    return "process" if offloads_saves(callback) else "thread"


def uses_model(callback: Any) -> bool:
    """Whether an offloaded `callback` needs a shadow model at all.

    Keras' CSVLogger and RemoteMonitor never read their model; their worker
    gets `set_model(None)` and no shadow is built. Subclasses may read it.
    """
    return type(callback) not in (_cb.CSVLogger, _cb.RemoteMonitor)


def _tensorboard_planner(callback: Any) -> Callable[[str, tuple], StateLevel]:
    def needs(hook: str, args: tuple) -> StateLevel:
        if hook == "on_epoch_end":
            epoch = args[0]
            for freq in (callback.histogram_freq, callback.embeddings_freq):
                if freq and epoch % freq == 0:
                    return StateLevel.WEIGHTS
            return StateLevel.SCALARS  # Learning rate, in the epoch logs.
        if hook == "on_test_end":
            return StateLevel.SCALARS  # `evaluation_*_vs_iterations`.
        if hook == "on_epoch_begin" and callback.write_steps_per_second:
            return StateLevel.SCALARS
        return StateLevel.NONE

    return needs


def _builtin_planner(callback: Any) -> Callable[[str, tuple], StateLevel] | None:
    if isinstance(callback, (_cb.CSVLogger, _cb.RemoteMonitor,
                             _cb.TerminateOnNaN)):
        return lambda hook, args: StateLevel.NONE
    if isinstance(callback, _cb.TensorBoard):
        return _tensorboard_planner(callback)
    if isinstance(callback, (_cb.ReduceLROnPlateau,
                             _cb.LearningRateScheduler)):
        return lambda hook, args: StateLevel.SCALARS
    if isinstance(callback, _cb.EarlyStopping):
        level = (StateLevel.WEIGHTS if callback.restore_best_weights
                 else StateLevel.SCALARS)
        return lambda hook, args: level
    return None


def state_planner(
    callback: Any, declared: StateSpec | None
) -> Callable[[str, tuple], StateLevel]:
    """What state each hook of `callback` needs, as a function.

    Args:
        callback: The wrapped callback.
        declared: What the user passed as `AsyncCallback(state=...)`; if
            `None`, the callback's own `asynccb_state` attribute, then what
            asynccb knows of the built-ins, then `"full"`: a callback we
            know nothing of may save the whole model, and a snapshot that
            missed the optimizer would make that file wrong.

    Returns:
        A function `(hook, args) -> StateLevel`.
    """
    if declared is None:
        declared = getattr(callback, "asynccb_state", None)
    if declared is None:
        planner = _builtin_planner(callback)
        if planner is not None:
            return planner
        declared = StateLevel.FULL
    if callable(declared) and not isinstance(declared, (str, StateLevel)):
        function = declared

        def planner(hook: str, args: tuple) -> StateLevel:
            return StateLevel.parse(function(hook, args), "state")

        return planner
    if isinstance(declared, Mapping):
        unknown = sorted(set(declared) - set(ALL_HOOKS))
        if unknown:
            raise ValueError(
                f"`state` maps unknown hook names {unknown}; hooks are "
                f"{', '.join(ALL_HOOKS)}. Received: state={declared!r}"
            )
        levels = {
            hook: StateLevel.parse(level, f"state[{hook!r}]")
            for hook, level in declared.items()
        }
        return lambda hook, args: levels.get(hook, StateLevel.NONE)
    level = StateLevel.parse(declared, "state")
    return lambda hook, args: level


def setup_state(callback: Any, declared: StateSpec | None) -> StateLevel:
    """What the shadow holds when `callback` is given it (`set_model`).

    In plain Keras `set_model` sees the live model as it is then: a second
    `fit` hands over a model whose optimizer has stepped and whose learning
    rate may have changed, and TensorBoard writes the model's config, the
    learning rate included, right there. The optimizer's scalars are a few
    bytes. A callback whose state is declared is taken at its word: its
    hooks say what it needs, and `set_model` is not one of them; the other
    built-ins read nothing there.
    """
    if declared is not None or getattr(callback, "asynccb_state", None):
        return StateLevel.NONE
    if isinstance(callback, _cb.TensorBoard):
        return StateLevel.SCALARS
    if _builtin_planner(callback) is not None:
        return StateLevel.NONE
    return StateLevel.SCALARS


def quiet_hooks(callback: Any) -> frozenset[str]:
    """Hooks of a built-in that, as configured, write and decide nothing.

    Offloading them would cost a dispatch per batch for no output. Keras'
    TensorBoard with `update_freq="epoch"`, no profiling and no
    steps-per-second only counts batches in its batch hooks (the counts
    serve batch-level writing, which is off); only its exact class, since a
    subclass may do more there.
    """
    if type(callback) is _cb.TensorBoard and (
        callback.update_freq == "epoch"
        and not callback._should_trace
        and not callback.write_steps_per_second
    ):
        return frozenset(
            hook for hook in ALL_HOOKS if "batch" in hook
        )
    return frozenset()


def model_changing_hooks(callback: Any) -> frozenset[str]:
    """The hooks after which a synchronous `callback` may have changed the
    model's variables, so that an earlier snapshot is stale."""
    if isinstance(callback, _READ_ONLY_TYPES):
        return frozenset()
    hooks = effective_hooks(callback)
    if isinstance(callback, _cb.EarlyStopping):
        # It restores the best weights at the end, and only then.
        return hooks & {"on_train_end"}
    if isinstance(callback, _cb.BackupAndRestore):
        return hooks & {"on_train_begin"}  # Its restore.
    return hooks
