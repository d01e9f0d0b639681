"""Shadow models: rebuilt copies of the live model that hold snapshots.

An offloaded callback never touches the model being trained. Its
`self.model` is a shadow: the same architecture, rebuilt from the live
model's serialized config, into which each hook's snapshot is copied before
the hook runs. Saving the shadow writes exactly the file that saving the
live model at dispatch would have written.
"""

from __future__ import annotations

import copy
import inspect
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import keras
import numpy as np

from asynccb._snapshot import (
    LayoutSpec,
    Snapshot,
    state_variables,
    variables_signature,
)

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.process.messages import SnapshotRef

__all__ = ["ModelBlueprint", "Shadow", "current_blueprint", "shared_shadow"]

_KERAS_MODULES = ("keras.", "tensorflow.", "tf_keras.")


def _sublayers(model: Any) -> list[Any]:
    # `_flatten_layers` is how Keras itself walks nested layers (saving,
    # summaries); there is no public equivalent.
    return list(model._flatten_layers(include_self=False, recursive=True))


def _custom_objects(model: Any) -> dict[str, Any]:
    """The classes and functions, outside Keras, that rebuilding needs.

    Collected from the live objects rather than found by module lookup, so
    a layer defined in `__main__`, in a test module, or inside a function
    rebuilds without any registration.
    """
    found: dict[str, Any] = {}

    def add(obj: Any) -> None:
        if obj is None or isinstance(obj, (str, int, float, bool)):
            return
        if isinstance(obj, (list, tuple)):
            for item in obj:
                add(item)
            return
        if isinstance(obj, dict):
            for item in obj.values():
                add(item)
            return
        target = obj if inspect.isclass(obj) or inspect.isfunction(obj) else (
            type(obj)
        )
        if target.__module__.startswith(_KERAS_MODULES):
            return
        found[keras.saving.get_registered_name(target)] = target

    add(model)
    for layer in _sublayers(model):
        add(layer)
    compile_config = getattr(model, "_compile_config", None)
    if compile_config is not None:
        add(compile_config.config)
    return found


def _compile(model: Any, compile_config: dict, optimizer_built: bool) -> None:
    if type(model).compile is not keras.Model.compile:
        # A custom `compile` takes its own config (Keras' rule for loading).
        model.compile_from_config(compile_config)
        return
    model.compile(**keras.saving.deserialize_keras_object(compile_config))
    if optimizer_built and model.built:
        model.optimizer.build(model.trainable_variables)


def _variable_count(model: Any) -> int:
    optimizer = getattr(model, "optimizer", None)
    return len(model.weights) + (len(optimizer.variables) if optimizer else 0)


def _state_nbytes(model: Any) -> int:
    optimizer = getattr(model, "optimizer", None)
    variables = list(model.weights) + (list(optimizer.variables)
                                       if optimizer else [])
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
               for v in variables)


def _unserializable_layer(model: Any) -> Any:
    """The first layer whose config cannot be taken, for error messages."""
    for layer in _sublayers(model):
        try:
            layer.get_config()
        except NotImplementedError:
            return layer
    return model


@dataclass
class ModelBlueprint:
    """Everything a worker needs to rebuild a model, without its weights.

    Attributes:
        config: The model's serialized form (`serialize_keras_object`),
            with its build and compile configs.
        custom_objects: The non-Keras classes and functions it refers to.
        layer_names: The names of the nested layers, in walk order. A
            rebuilt subclassed model names its sublayers afresh (Keras
            counts names per thread), and saved files use these names.
        weight_paths: The paths of the model's weights (`variable.path`,
            fixed when a layer is built, from the name scopes then open):
            TensorBoard's histograms are tagged with them, and a rebuilt
            model would name them after its own build.
    """

    config: dict
    custom_objects: dict[str, Any] = field(default_factory=dict)
    layer_names: list[str] = field(default_factory=list)
    weight_paths: list[str] = field(default_factory=list)
    variable_count: int = 0
    optimizer_built: bool = False
    key: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def of(cls, model: Any) -> "ModelBlueprint":
        """Takes the blueprint of `model`.

        Raises:
            ValueError: If the model cannot be serialized; the message names
                the layer that lacks a `get_config()`.
        """
        try:
            config = keras.saving.serialize_keras_object(model)
        except NotImplementedError as exc:
            layer = _unserializable_layer(model)
            raise ValueError(
                f"asynccb cannot rebuild model {model.name!r} for an "
                f"offloaded callback: layer {layer.name!r} "
                f"({type(layer).__name__}) does not implement "
                "`get_config()`. Implement `get_config()` on it, or keep the "
                "callbacks that need the model synchronous (do not wrap them "
                "in AsyncCallback)."
            ) from exc
        return cls(
            config=config,
            custom_objects=_custom_objects(model),
            layer_names=[layer.name for layer in _sublayers(model)],
            weight_paths=[weight.path for weight in model.weights],
            variable_count=_variable_count(model),
            optimizer_built=bool(getattr(model.optimizer, "built", False))
            if getattr(model, "optimizer", None) is not None else False,
        )

    def is_current(self, model: Any) -> bool:
        """Whether `model` still has the variables it had when taken (a
        model built, or an optimizer created, later needs a new one)."""
        return _variable_count(model) == self.variable_count

    def build(self) -> Any:
        """Rebuilds the model: built and compiled as the original was, with
        its optimizer built only if the original's was (a saved file lists
        the optimizer variables that exist).

        The blueprint is left as it was: one blueprint serves every lane of
        a run, and Keras' `from_config` pops keys out of the config it is
        given (a functional model's layers and inputs), so each build works
        on its own copy.
        """
        config = copy.deepcopy(self.config)
        compile_config = config.pop("compile_config", None)
        with keras.saving.CustomObjectScope(self.custom_objects):
            # The config is our own, taken from the user's live model, so
            # `Lambda` layers are as trusted as the user's code.
            model = keras.saving.deserialize_keras_object(
                config, safe_mode=False
            )
            if compile_config:  # `{}` for a model never compiled.
                _compile(model, compile_config, self.optimizer_built)
        layers = _sublayers(model)
        if len(layers) == len(self.layer_names):
            for layer, name in zip(layers, self.layer_names):
                layer.name = name
        weights = model.weights
        if len(weights) == len(self.weight_paths):
            for weight, path in zip(weights, self.weight_paths):
                weight._path = path  # No public setter: `path` is fixed.
        return model


_blueprints: weakref.WeakKeyDictionary[Any, ModelBlueprint] = (
    weakref.WeakKeyDictionary())
_blueprints_lock = threading.Lock()


def current_blueprint(model: Any) -> ModelBlueprint:
    """The blueprint of `model`, retaken when its variables changed (it
    was built, or its optimizer created, since).

    One per model in the training process, whichever lists and callbacks
    use it, so their lanes in a worker can share a shadow.

    Raises:
        ValueError: If the model cannot be serialized.
    """
    with _blueprints_lock:
        blueprint = _blueprints.get(model)
        if blueprint is None or not blueprint.is_current(model):
            blueprint = _blueprints[model] = ModelBlueprint.of(model)
        return blueprint


class Shadow:
    """A worker's shadow of the live model: built from one blueprint on
    first use, then given snapshots.

    Args:
        blueprint: What to build it from.
        shared: Whether lanes share it (see `shared_shadow`).

    Attributes:
        blueprint: As given.
        lock: Held while a task uses a shadow that lanes share.
    """

    def __init__(self, blueprint: ModelBlueprint, shared: bool = False):
        self.blueprint = blueprint
        self.shared = shared
        self.model: Any = None
        self.nbytes = 0  # Of its state, once built.
        self.lock = threading.Lock()
        self._signatures: dict[int, tuple] = {}
        self._holding: int | None = None  # The serial of the last snapshot.

    def get(self) -> Any:
        """The shadow model, built on first use."""
        if self.model is None:
            self.model = self.blueprint.build()
            self.nbytes = _state_nbytes(self.model)
        return self.model

    def apply(self, snapshot: Snapshot | SnapshotRef) -> Any:
        """Copies `snapshot` (in a worker process, a `SnapshotRef`) into
        the shadow's variables, unless the shadow is shared and holds it
        already (it was applied for another lane; no code changes a shared
        shadow between tasks, while a callback may change its own).

        Returns:
            The shadow model holding the snapshot.

        Raises:
            ValueError: If the rebuilt model's variables do not match.
        """
        model = self.get()
        if self.shared and snapshot.serial == self._holding:
            return model
        variables = self._matching_variables(model, snapshot.layout)
        if variables is None:
            raise ValueError(
                f"asynccb rebuilt model {model.name!r} but its variables "
                "do not match the live model's: "
                f"{len(snapshot.layout.slots)} live variables, "
                f"{len(state_variables(model, snapshot.level))} rebuilt. "
                "Its `get_config()`/`from_config()` may not round-trip."
            )
        self._holding = None  # Half-copied if an assignment fails.
        for variable, value in zip(variables, snapshot.arrays()):
            variable.assign(value)
        model.stop_training = snapshot.stop_training
        self._holding = snapshot.serial
        return model

    def _matching_variables(self, model: Any, layout: LayoutSpec):
        """The shadow's variables for `layout`, or `None` on a mismatch."""
        variables = state_variables(model, layout.level)
        signature = self._signatures.get(layout.level)
        if signature is None:
            signature = variables_signature(variables)
            self._signatures[layout.level] = signature
        return variables if signature == layout.signature else None


_shared: weakref.WeakValueDictionary[str, Shadow] = (
    weakref.WeakValueDictionary())
_shared_lock = threading.Lock()


def shared_shadow(blueprint: ModelBlueprint) -> Shadow:
    """The shadow of `blueprint` shared by the lanes of this process that
    only save (their callbacks stay on the training thread, so no user
    code holds the shadow between tasks); it lives while one uses it.

    Lanes whose callback is given the shadow each keep their own: the
    callback holds it between hooks and may change it.
    """
    with _shared_lock:
        shadow = _shared.get(blueprint.key)
        if shadow is None:
            shadow = _shared[blueprint.key] = Shadow(blueprint, shared=True)
        return shadow
