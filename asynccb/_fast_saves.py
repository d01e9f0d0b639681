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

import os
from typing import TYPE_CHECKING, Any

from asynccb._errors import CannotCopySave
from asynccb._file_template import (
    Template,
    learn_keras_file,
    learn_weights_file,
)
from asynccb._save_sources import dataset_slots
from asynccb._saving import atomic_path, save_atomically, save_target
from asynccb._snapshot import state_variables

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._shadow import Shadow
    from asynccb._tasks import Task

__all__ = ["FAST", "save"]

FAST = "fast"
_FIRST = "keras: first save of its layout (learning the file)"
_CONFIG = ("keras: the config changed (an optimizer hyperparameter such as "
           "the learning rate); learning the file again")


def _form(task: Task) -> tuple[str | None, str]:
    """Which template a save can use (`"keras"`, `"weights"`), or `None`
    and why not."""
    if not task.fast:
        return None, "keras: fast saves switched off (fast_saves=False)"
    filepath, *rest = task.args
    filepath = os.fspath(filepath)
    extra = {key: value for key, value in task.kwargs.items()
             if key != "overwrite"}
    if "://" in filepath:
        return None, "keras: a remote path"
    if rest or extra:
        names = ", ".join(sorted(extra)) or "positional arguments"
        return None, f"keras: saved with {names}"
    if task.name == "save" and filepath.endswith(".keras"):
        return "keras", ""
    if task.name == "save_weights" and filepath.endswith(".weights.h5"):
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


def _learn(form: str, path: str, model: Any, snapshot: Any) -> Template:
    variables = state_variables(model, snapshot.level)
    slots = dataset_slots(model, variables)
    arrays = snapshot.arrays()
    if form == "weights":
        return learn_weights_file(path, slots, arrays)
    return learn_keras_file(path, slots, arrays,
                            _config_slots(model, variables))


def save(shadow: Shadow, task: Task) -> str:
    """Runs the save `task` with the state of its snapshot.

    Returns:
        The path the save took: `"fast"`, or `"keras: <why>"`.

    Raises:
        Whatever Keras' save or the file system raises.
    """
    snapshot = task.snapshot
    assert snapshot is not None, "a save always has a snapshot"
    form, reason = _form(task)
    key = (form, snapshot.layout.signature)
    known = shadow.templates.get(key) if form else None
    filepath, overwrite = task.args[0], task.kwargs.get("overwrite", True)
    if isinstance(known, Template) and known.fits(snapshot.arrays()):
        with atomic_path(save_target(filepath, overwrite)) as tmp:
            known.write(tmp, snapshot.arrays())
        return FAST
    if isinstance(known, str):
        reason = known  # Learning showed this layout cannot be copied.
    elif form:
        reason = _FIRST if known is None else _CONFIG
    model = shadow.apply(snapshot)

    def learn(tmp: str) -> None:
        assert form is not None
        try:
            shadow.templates[key] = _learn(form, tmp, model, snapshot)
        except CannotCopySave as exc:
            shadow.templates[key] = f"keras: {exc}"

    save_atomically(model, task.name, task.args, task.kwargs,
                    then=learn if form and not isinstance(known, str)
                    else None)
    learned = shadow.templates.get(key) if form else None
    return learned if isinstance(learned, str) else reason
