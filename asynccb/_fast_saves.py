"""The two paths of an offloaded save: fast copies, or Keras' own writer.

The first save of a layout goes through Keras' writer, on a shadow holding
the snapshot, and asynccb learns the file's template from what Keras wrote
(`asynccb._file_template`). Every later save of that layout writes the
template with the snapshot's buffers in place: no shadow, no HDF5 library,
no per-variable copies. What cannot be proved equal to Keras' file keeps
going through Keras, and each save's path (with the reason for Keras') is
counted in `stats()`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from asynccb._backups import BACKUP, write_backup
from asynccb._errors import CannotCopySave
from asynccb._file_template import (
    Template,
    learn_keras_file,
    learn_weights_file,
)
from asynccb._save_sources import dataset_slots
from asynccb._saving import atomic_path, save_atomically, save_target
from asynccb._snapshot import (
    Snapshot,
    StateLevel,
    host_array,
    state_variables,
    variables_signature,
)

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._shadow import Shadow
    from asynccb._tasks import Task

__all__ = ["FAST", "learned_phases", "save", "route_saves"]

logger = logging.getLogger("asynccb")

FAST = "fast"
_FIRST = "keras: first save of its layout (learning the file)"
_CONFIG = ("keras: the config changed (an optimizer hyperparameter such as "
           "the learning rate); learning the file again")


# What fast saves learned of each model's files, by blueprint (one per live
# model and variable set), then by format and layout: a `Template`, or why
# its saves need Keras. Kept past the shadow, which a large model drops at
# the end of each run, so that the next run of the same model (a notebook's
# next `fit`, in a warm worker or in this process) saves fast from its first
# save. A template is a file's bytes without its data: kilobytes, a few
# megabytes for a model of many layers; the least recently used models'
# are forgotten past `_MODELS_KEPT`.
_MODELS_KEPT = 8
_learned: collections.OrderedDict[str, dict[tuple, Any]] = (
    collections.OrderedDict())
_learned_lock = threading.Lock()


def _templates(shadow: Shadow) -> dict[tuple, Any]:
    with _learned_lock:
        templates = _learned.setdefault(shadow.blueprint.key, {})
        _learned.move_to_end(shadow.blueprint.key)
        while len(_learned) > _MODELS_KEPT:
            _learned.popitem(last=False)
        return templates


def _form(method: str, args: tuple, kwargs: dict,
          fast: bool) -> tuple[str | None, str]:
    """Which template a save can use (`"keras"`, `"weights"`), or `None`
    and why not."""
    if not fast:
        return None, "keras: fast saves switched off (fast_saves=False)"
    filepath, *rest = args
    filepath = os.fspath(filepath)
    extra = {key: value for key, value in kwargs.items()
             if key != "overwrite"}
    if "://" in filepath:
        return None, "keras: a remote path"
    if rest or extra:
        names = ", ".join(sorted(extra)) or "positional arguments"
        return None, f"keras: saved with {names}"
    if method == "save" and filepath.endswith(".keras"):
        return "keras", ""
    if method == "save_weights" and filepath.endswith(".weights.h5"):
        return "weights", ""
    return None, "keras: a format other than .keras and .weights.h5"


def _config_slots(model: Any, variables: list[Any]) -> tuple[int, ...]:
    """The slots of the optimizer's floating-point scalars (a learning
    rate): the only state a `.keras` file's config.json depends on."""
    optimizer = getattr(model, "optimizer", None)
    owned = {id(v) for v in optimizer.variables} if optimizer else set()
    return tuple(
        i for i, v in enumerate(variables)
        if id(v) in owned and len(v.shape) == 0
        and "float" in str(v.dtype))


@dataclass
class _State:
    """What a save writes: values in snapshot order, and how to get a
    model holding them for Keras' writer."""

    level: StateLevel
    signature: tuple
    arrays: Callable[[], Sequence[np.ndarray]]
    model: Callable[[], Any]
    written: Callable[[], None] = lambda: None
    """Called once the values are in the file (before it is synced)."""
    slot_written: Callable[[int], None] = lambda slot: None
    """Called with each slot once its value is in the file."""


def _save(shadow: Shadow, method: str, args: tuple, kwargs: dict,
          fast: bool, state: _State) -> str:
    form, reason = _form(method, args, kwargs, fast)
    key = (form, state.signature)
    templates = _templates(shadow)
    known = templates.get(key) if form else None
    if isinstance(known, Template) and known.fits(state.arrays()):
        target = save_target(args[0], kwargs.get("overwrite", True))
        with atomic_path(target) as tmp:
            known.write(tmp, state.arrays(), state.slot_written)
            state.written()  # Before the sync, which may take a while.
        return FAST
    if isinstance(known, str):
        reason = known  # Learning showed this layout cannot be copied.
    elif form:
        reason = _FIRST if known is None else _CONFIG
    model = state.model()

    def learn(tmp: str) -> None:
        assert form is not None
        variables = state_variables(model, state.level)
        try:
            slots = dataset_slots(model, variables)
            templates[key] = (
                learn_weights_file(tmp, slots, state.arrays())
                if form == "weights" else learn_keras_file(
                    tmp, slots, state.arrays(),
                    _config_slots(model, variables)))
        except CannotCopySave as exc:
            templates[key] = f"keras: {exc}"
        except (OSError, MemoryError):
            raise  # The file system's trouble: the save's, the user's.
        except Exception as exc:  # A file asynccb does not know how to read.
            templates[key] = (
                f"keras: learning the file failed ({type(exc).__name__})")
            logger.warning("asynccb: cannot learn the layout of %s; its "
                           "saves go through Keras' writer", args[0],
                           exc_info=True)

    save_atomically(model, method, args, kwargs,
                    then=learn if form and not isinstance(known, str)
                    else None)
    learned = templates.get(key) if form else None
    return learned if isinstance(learned, str) else reason


def save(shadow: Shadow, task: Task) -> str:
    """Runs the save `task` with the state of its snapshot.

    Returns:
        The path the save took: `"fast"`, or `"keras: <why>"`.

    Raises:
        Whatever Keras' save or the file system raises.
    """
    snapshot = task.snapshot
    assert snapshot is not None, "a save always has a snapshot"
    state = _State(snapshot.level, snapshot.layout.signature,
                   snapshot.arrays, lambda: shadow.apply(snapshot))
    if isinstance(snapshot, Snapshot):
        # Held in this process: held tensors that training updates, it
        # copies, so the save lets go of each as soon as the file has it.
        state.slot_written = snapshot.let_go_of
        state.written = task.release_snapshot
    if task.name == BACKUP:
        return write_backup(
            lambda path: _save(shadow, "save_weights", (path,), {},
                               task.fast, state), task.args)
    return _save(shadow, task.name, task.args, task.kwargs, task.fast,
                 state)


def learned_phases(shadow: Shadow, task: Task,
                   signature: tuple) -> dict[int, int]:
    """Where the file of the save `task` puts the large slots of its
    snapshot, of `signature`, within a page (see `Template.phases`), once
    learned; else none."""
    if task.name == BACKUP:
        form: str | None = "weights"
    else:
        form, _ = _form(task.name, task.args, task.kwargs, task.fast)
    if form is None:
        return {}
    known = _templates(shadow).get((form, signature))
    return known.phases() if isinstance(known, Template) else {}


def route_saves(shadow: Shadow, fast: bool, paths: list[str]) -> None:
    """Makes the shadow model's `save` and `save_weights` (an offloaded
    callback saving `self.model`) atomic and fast as a checkpoint's are,
    from the state the shadow holds (which the callback may have
    changed); each save's path is appended to `paths`."""
    model = shadow.get()

    def own_state() -> _State:
        variables = state_variables(model, StateLevel.FULL)
        return _State(StateLevel.FULL, variables_signature(variables),
                      lambda: [host_array(v.value.read_value())
                               for v in variables],
                      lambda: model)

    def saver(method: str) -> Callable[..., None]:
        def save_own(*args: Any, **kwargs: Any) -> None:
            paths.append(_save(shadow, method, args, kwargs, fast,
                               own_state()))
        save_own.__doc__ = getattr(type(model), method).__doc__
        return save_own

    for method in ("save", "save_weights"):
        # An instance attribute, past Keras' tracking `__setattr__`.
        object.__setattr__(model, method, saver(method))
