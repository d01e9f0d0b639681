"""Which snapshot slot each dataset of Keras' weights file holds.

Keras writes a model's state by walking it (`saving_lib._save_state`): each
layer and optimizer puts its values into a store under `<path>/vars/<key>`.
asynccb runs that same walk, once per layout, with a store that records
instead of writing, and so learns which variable each dataset holds. A value
that is one of the variables is known by identity; Keras' optimizers store
copies of theirs in order, which is known by rule. Any other value (a kernel
merged with LoRA, a vocabulary, a computed array) is not a copy of the
snapshot, and the model's saves keep going through Keras. So do models
whose layers, optimizer or model class save themselves with code of their
own (`save_own_variables`, `save_assets`, `save`, `save_weights` defined
outside Keras): that code may do more than store values, and Keras calls it
on every save, which a copied file would skip.

Everything here leans on Keras' private saving module; if a Keras version
changes it, `dataset_slots` raises `CannotCopySave` and saves take Keras'
own path. The file that Keras writes is checked against what was learned
anyway (see `asynccb._file_template`).
"""

from __future__ import annotations

from typing import Any, Sequence

import keras

from asynccb._errors import CannotCopySave

__all__ = ["dataset_slots", "dataset_name"]


def dataset_name(path: str, key: str) -> str:
    """The HDF5 name of the dataset Keras writes for `store[key]` at
    `path` (`H5IOStore._create_h5_group`)."""
    return f"{path}/vars/{key}" if path else f"vars/{key}"


def _recording_store() -> Any:
    """A store that passes Keras' type check and records what it is given."""
    from keras.src.saving.saving_lib import H5IOStore

    class RecordingStore(H5IOStore):
        def __init__(self) -> None:  # No file: nothing is written.
            self.entries: list[tuple[str, str, Any, str]] = []
            self.path = self.owner = ""

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: Any = None) -> "RecordingStore":
            self.path = path
            self.owner = (metadata or {}).get("name", "")
            return self

        def __setitem__(self, key: str, value: Any) -> None:
            self.entries.append((self.path, str(key), value, self.owner))

        def __getattr__(self, name: str) -> Any:
            # A `save_own_variables` that reads the store (its keys, its
            # length) is beyond what is recorded here.
            raise CannotCopySave(
                f"a saveable at {self.path or 'the model'!r} uses its "
                f"store's {name!r} while saving")

    return RecordingStore()


def _walk(obj: Any, path: str) -> Any:
    for part in path.split("/") if path else ():
        obj = getattr(obj, part, None)
    return obj


def _optimizer_variable(model: Any, path: str, key: str) -> Any:
    """The variable behind `store[key]` of an optimizer at `path`, if it is
    one whose `save_own_variables` is Keras' own (`store[str(i)] =
    variables[i].numpy()`)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer

    optimizer = _walk(model, path)
    if not isinstance(optimizer, BaseOptimizer) or (
            type(optimizer).save_own_variables
            is not BaseOptimizer.save_own_variables):
        return None
    try:
        return optimizer.variables[int(key)]
    except (ValueError, IndexError):
        return None


def _own_saving_code(model: Any) -> str | None:
    """What of `model` saves itself with code from outside Keras, if any."""
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", None)
    saveables = [model, *model._flatten_layers(include_self=False),
                 optimizer, inner]
    methods = ("save_own_variables", "save_assets")
    checks = [(model, ("save", "save_weights"))] + [
        (saveable, methods) for saveable in saveables if saveable is not None]
    for saveable, names in checks:
        for name in names:
            code = getattr(type(saveable), name, None)
            if code is not None and not getattr(
                    code, "__module__", "").startswith("keras."):
                return f"{type(saveable).__name__}.{name}"
    return None


def dataset_slots(model: Any, variables: Sequence[Any]) -> dict[str, int]:
    """Maps each dataset Keras writes for `model` to its snapshot slot.

    Args:
        model: The (shadow) model, built as the file will be written.
        variables: Its variables in snapshot order (`state_variables`).

    Returns:
        A dict from HDF5 dataset name to index in `variables`.

    Raises:
        CannotCopySave: If a dataset holds anything but a copy of one of
            `variables`, or Keras' walk cannot be followed.
    """
    own = _own_saving_code(model)
    if own is not None:
        raise CannotCopySave(f"{own} is not Keras' own")
    slot_of = {id(variable): i for i, variable in enumerate(variables)}
    store = _recording_store()
    try:
        from keras.src.saving.saving_lib import _save_state

        _save_state(model, weights_store=store, assets_store=None,
                    inner_path="", visited_saveables=set())
    except CannotCopySave:
        raise
    except Exception as exc:  # A Keras whose writer is not the one known.
        raise CannotCopySave(
            f"Keras {keras.__version__}'s writer could not be followed "
            f"({type(exc).__name__}: {exc})") from exc
    slots: dict[str, int] = {}
    for path, key, value, owner in store.entries:
        name = dataset_name(path, key)
        variable = value if isinstance(value, keras.Variable) else (
            _optimizer_variable(model, path, key))
        if variable is None:
            raise CannotCopySave(
                f"{name} (of {owner or path!r}) holds a value computed "
                "while saving, not a copy of a variable")
        slot = slot_of.get(id(variable))
        if slot is None:
            raise CannotCopySave(
                f"{name} holds {variable.path}, which the snapshot lacks")
        if name in slots:
            raise CannotCopySave(f"{name} is written twice")
        slots[name] = slot
    return slots
