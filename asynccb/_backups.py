"""BackupAndRestore, offloaded: its backups in a worker, the rest inline.

Keras' `BackupAndRestore` decides on the training thread when to back up
(counters) and restores at `on_train_begin` (weights into the live model,
the initial epoch): those stay there. A backup (`_save_model`) is four
steps that must happen in order and from one state: the previous backup
kept (`double_checkpoint`), the weights written, then the training
metadata (epoch, batch) naming them. Offloaded, the whole backup is one
queued task with the snapshot of its step; the worker writes each file
atomically, so a run killed mid-backup leaves the last complete backup
for the next run to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

from asynccb._saving import atomic_path, save_target

__all__ = ["BACKUP", "route_backups", "unroute_backups", "write_backup"]

BACKUP = "backup"
"""The name of a backup save task."""


def route_backups(callback: Any,
                  submit_save: Callable[[str, tuple, dict], None]) -> None:
    """Makes a BackupAndRestore's `_save_model` queue one backup task
    (`submit_save(BACKUP, args, {})`) instead of writing the files itself;
    does nothing to other callbacks."""
    from keras.callbacks import BackupAndRestore

    if not isinstance(callback, BackupAndRestore):
        return

    def queue_backup() -> None:
        submit_save(BACKUP, (
            callback._weights_path,
            callback._training_metadata_path,
            callback._prev_weights_path if callback.double_checkpoint
            else None,
            callback._prev_training_metadata_path,
            # What Keras writes beside the weights, as it is at this step.
            {"epoch": callback._current_epoch,
             "batch": callback._last_batch_seen},
        ), {})

    callback._save_model = queue_backup  # On the instance: undone below.


def unroute_backups(callback: Any) -> None:
    """Gives `callback` its own `_save_model` back (end of the run)."""
    callback.__dict__.pop("_save_model", None)


def _exists(path: str) -> bool:
    if "://" in path:
        from keras.src.utils import file_utils

        return bool(file_utils.exists(path))
    return os.path.exists(path)


def _copy(source: str, target: str) -> None:
    if "://" in target:  # A remote store replaces objects whole anyway.
        from keras.src.utils import file_utils

        file_utils.copy(source, target)
        return
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def write_backup(save_weights: Callable[[str], str], args: tuple) -> str:
    """Writes one backup, as Keras' `BackupAndRestore._save_model` does,
    each file atomically.

    Args:
        save_weights: Saves the snapshot's weights to a path (atomically);
            returns the path the save took (see `asynccb._fast_saves`).
        args: What `route_backups` queued.

    Returns:
        The path the weights' save took.
    """
    weights, metadata, prev_weights, prev_metadata, training = args
    save_target(weights, overwrite=True)  # Makes the directory.
    if prev_weights is not None:  # `double_checkpoint`: keep the last one.
        if _exists(weights):
            _copy(weights, prev_weights)
        if _exists(metadata):
            _copy(metadata, prev_metadata)
    path = save_weights(weights)
    # After the weights: the metadata names a backup that is complete.
    from keras.src.utils import file_utils  # Local and remote paths.

    with atomic_path(metadata) as tmp, file_utils.File(tmp, "w") as file:
        file.write(json.dumps(training))
    return path
