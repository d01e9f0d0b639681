"""Work items of an offloaded callback, and what runs them in a worker."""

from __future__ import annotations

import contextlib
import gc
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from asynccb._backups import BACKUP
from asynccb._errors import ControlFromWorkerError
from asynccb._hooks import BATCH_HOOKS, EPOCH_HOOKS, call_hook, describe_call
from asynccb._fast_saves import learned_phases, route_saves, save
from asynccb._shadow import ModelBlueprint, Shadow, shared_shadow
from asynccb._snapshot import Snapshot

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._executors.process.messages import SnapshotRef

__all__ = ["Task", "TaskRunner"]

_SETUP = ("set_model", "attach")  # Tasks that give the callback its shadow.
# The state size from which a shadow dropped at the end of a run is
# collected at once rather than by Python's cycle collector, some time.
COLLECT_SHADOWS_FROM = 256 * 2**20


@dataclass
class Task:
    """One unit of work for an offloaded callback, in dispatch order.

    Attributes:
        kind: `"hook"` (call a hook), `"save"` (save the shadow model),
            `"set_model"`, `"attach"` (give the callback a shadow without
            calling its `set_model`: a list reused for another run, which
            Keras does not set again) or `"set_params"`.
        name: The hook or model method name.
        args: Positional arguments: `(epoch,)`, `(batch,)`, `(filepath,)`.
        logs: The hook's private copy of `logs`.
        kwargs: Keyword arguments of a save.
        snapshot: The model state the work sees, or `None` (in a worker
            process, a `SnapshotRef` to it).
        model: The `ModelBlueprint` the shadow is built from, on tasks that
            need a shadow (`None` for a callback that never uses its model).
        fast: For a save, whether it may take the fast path (see
            `asynccb._fast_saves`).
    """

    kind: str
    name: str
    args: tuple = ()
    logs: Any = None
    kwargs: dict = field(default_factory=dict)
    snapshot: Snapshot | SnapshotRef | None = None
    model: Any = None
    fast: bool = True

    @property
    def droppable(self) -> bool:
        """Whether a full-queue policy may drop it: saves and batch or
        epoch hooks. Setup and `on_*_begin`/`on_*_end` always run: a
        CSVLogger that never saw `on_train_begin` could not write at all."""
        return self.kind == "save" or (
            self.kind == "hook" and self.name in BATCH_HOOKS + EPOCH_HOOKS
        )

    def describe(self) -> str:
        if self.kind == "save":
            what = ("backup" if self.name == BACKUP
                    else f"model.{self.name}")
            return f"{what}({self.args[0]!r})"
        if self.kind == "hook":
            return describe_call(self.name, self.args)
        return f"{self.name}()"

    def release_snapshot(self) -> None:
        """Lets go of the snapshot, in the training process, once the work
        no longer reads it (a save whose bytes are written): training's
        next update then need not copy the values it holds. Idempotent."""
        snapshot, self.snapshot = self.snapshot, None
        if snapshot is not None:
            # Only a worker process' tasks hold a `SnapshotRef`.
            assert isinstance(snapshot, Snapshot), snapshot
            snapshot.release()


def _learning_rate(model: Any) -> float | None:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return None
    try:
        return float(np.asarray(optimizer.learning_rate))
    except (TypeError, ValueError, AttributeError):
        return None  # A schedule: not something a callback sets.


class TaskRunner:
    """Runs tasks in a worker: against the callback and a shadow model.

    Args:
        callback: The wrapped callback for hook tasks, or `None` for a lane
            that only saves.
        deferred_control: Whether control effects (stop training, a new
            learning rate) made on the shadow are returned for the training
            thread to apply, instead of being an error.
    """

    def __init__(self, callback: Any, deferred_control: bool):
        self.callback = callback
        self.deferred_control = deferred_control
        self.capacity = 1  # Unused: it maps no buffers (see `Runner`).
        self.shadow: Shadow | None = None
        self._published: Any = None  # The shadow the callback was given.
        self._fast_saves = True
        self._save_paths: list[str] = []  # Of the callback's own saves.

    def _select_shadow(self, task: Task) -> None:
        """Points `shadow` at the one for the task's blueprint."""
        blueprint: ModelBlueprint | None = task.model
        if blueprint is None:
            if task.kind in _SETUP:
                self.shadow = None  # A callback that never uses its model.
            return
        if self.shadow is not None and self.shadow.blueprint.key == (
            blueprint.key
        ):
            return
        # A lane that only saves shares its shadow with the other such
        # lanes of the model (see `shared_shadow`); a callback's shadow is
        # its own.
        self.shadow = (shared_shadow(blueprint) if self.callback is None
                       else Shadow(blueprint))

    def prepare_callback(self) -> None:
        """Nothing to prepare: the worker shares this process' callback."""

    def is_coroutine_hook(self, task: Task) -> bool:
        return task.kind == "hook" and inspect.iscoroutinefunction(
            getattr(self.callback, task.name)
        )

    def prepare(self, task: Task) -> Any:
        """Builds or updates the shadow model the task will see.

        Returns:
            The control state (stop flag, learning rate) before the task,
            to compare with after it.
        """
        self._select_shadow(task)
        return self._prepare(task)

    def _prepare(self, task: Task) -> Any:
        if self.shadow is None:
            return None
        if task.kind in _SETUP:
            if self.callback is None:
                # A lane that only saves: its shadow is built when a save
                # needs Keras' writer, never if fast saves know the files
                # (a model's next run: at 300 MiB of state, a build costs
                # a worker a second of CPU and the state's memory).
                return None
            self.shadow.get()  # Build now, ahead of the first snapshot.
            if task.snapshot is not None:
                self.shadow.apply(task.snapshot)
            return None
        model = self.shadow.model
        if task.kind == "save":
            return None  # The save decides whether it needs the shadow.
        if task.snapshot is not None:
            model = self.shadow.apply(task.snapshot)
            if self._published is not None and model is not self._published:
                # The shadow was rebuilt because the live model grew (built
                # on its first step, in a hand-written loop): the callback
                # follows it, as it would follow the live model.
                if getattr(self.callback, "_model", None) is self._published:
                    self.callback._model = model
                self._publish(model)
        if task.kind != "hook" or model is None:
            return None
        return (bool(getattr(model, "stop_training", False)),
                _learning_rate(model))

    def invoke(self, task: Task) -> Any:
        """Runs the task's work; returns what the hook returned, or for a
        save the path it took (`asynccb._fast_saves.save`).

        For a coroutine hook this returns the coroutine, to be awaited.
        """
        if task.kind in _SETUP:
            model = self.shadow.model if self.shadow is not None else None
            if self.callback is not None:
                self._fast_saves = task.fast
                self._publish(model)
                if task.kind == "set_model":
                    self.callback.set_model(model)
                else:
                    self.callback._model = model
            return None
        if task.kind == "set_params":
            if self.callback is not None:
                self.callback.set_params(task.args[0])
            return None
        if task.kind == "save":
            assert self.shadow is not None, "a save always has a blueprint"
            return save(self.shadow, task)
        return call_hook(self.callback, task.name, task.args, task.logs)

    def _publish(self, model: Any) -> None:
        """Gives the callback's shadow asynccb's saves (atomic, fast)."""
        if model is not None and self.shadow is not None:
            route_saves(self.shadow, self._fast_saves, self._save_paths)
        self._published = model

    def effects(self, task: Task, before: Any) -> dict[str, Any]:
        """The control effects the task made on the shadow, and the paths
        its saves of the shadow took (`save_paths`).

        Raises:
            ControlFromWorkerError: If there are effects and the callback
                was not wrapped with `deferred_control=True`.
        """
        paths, self._save_paths[:] = list(self._save_paths), []
        found = self._control_effects(task, before)
        if paths:
            found["save_paths"] = paths
        return found

    def _control_effects(self, task: Task, before: Any) -> dict[str, Any]:
        if before is None or self.shadow is None:
            return {}
        model = self.shadow.model
        stop_before, lr_before = before
        effects: dict[str, Any] = {}
        if bool(getattr(model, "stop_training", False)) and not stop_before:
            effects["stop_training"] = True
        lr_after = _learning_rate(model)
        if lr_after is not None and lr_after != lr_before:
            effects["learning_rate"] = lr_after
        if effects and not self.deferred_control:
            what = " and ".join(
                "set model.stop_training" if key == "stop_training"
                else "changed the learning rate" for key in effects
            )
            raise ControlFromWorkerError(
                f"{type(self.callback).__name__}.{task.name} {what} from its "
                "worker, on a shadow of the model, where it has no effect on "
                "training. Keep this callback synchronous (do not wrap it), "
                "or wrap it with AsyncCallback(..., deferred_control=True) to "
                "have the effect applied to the live model at a later hook."
            )
        return effects

    def run(self, task: Task) -> dict[str, Any]:
        """Prepares, invokes and checks a synchronous task; returns its
        control effects, and the paths its saves took (`save_paths`).

        A shared shadow is held for the whole task: another lane may not
        copy its snapshot in while this one saves. (Only lanes that save
        share one, and their tasks all come here, never as coroutines.)
        """
        self._select_shadow(task)
        shadow = self.shadow
        # Taken now: a fast save lets go of its snapshot as it writes.
        layout = task.snapshot.layout if task.snapshot is not None else None
        with shadow.lock if shadow is not None else contextlib.nullcontext():
            before = self._prepare(task)
            result = self.invoke(task)
            effects = self.effects(task, before)
        if task.kind == "save":  # Counted in the lane's stats.
            effects.setdefault("save_paths", []).append(result)
            if layout is not None and not layout.phases and shadow:
                # For the training process to lay out the next snapshots
                # where the file puts the state.
                phases = learned_phases(shadow, task, layout.signature)
                if phases:
                    effects["file_phases"] = (layout.level, layout.signature,
                                              phases)
        return effects

    def close(self) -> None:
        """Drops the shadow model (end of run): its memory is released
        (a shared one, once no lane uses it).

        A Keras model holds reference cycles, so a dropped shadow is freed
        only when Python's cycle collector next runs, which may be several
        runs later: a large one is collected now."""
        shadow, self.shadow = self.shadow, None
        self._published = None
        if shadow is not None and shadow.nbytes >= COLLECT_SHADOWS_FROM:
            del shadow
            gc.collect()  # About 0.1 s, once per run, for a large model.
