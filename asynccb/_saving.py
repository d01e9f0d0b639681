"""Model saves that run in a worker and land atomically."""

from __future__ import annotations

import contextlib
import glob
import os
import uuid
from typing import Any, Callable, Iterator

__all__ = [
    "atomic_path",
    "save_atomically",
    "save_target",
    "remove_in_progress",
    "remove_temporaries",
    "OffloadedSavesModel",
]

# Temporary files being written by this process, for a worker that must
# exit at once (its training process died) to remove on its way out.
_in_progress: set[str] = set()

# Keras picks the file format from the name's ending, so a temporary name
# must keep it.
_SUFFIXES = (".weights.h5", ".weights.json", ".keras", ".h5")


def _split_suffix(basename: str) -> tuple[str, str]:
    for suffix in _SUFFIXES:
        if basename.endswith(suffix):
            return basename[: -len(suffix)], suffix
    stem, ext = os.path.splitext(basename)
    return stem, ext


def temporary_name(path: str, pid: int | None = None, token: str = "") -> str:
    """A hidden name beside `path`, with the same file ending, naming the
    writing process (`pid`) and unique within it (`token`)."""
    directory, basename = os.path.split(path)
    stem, suffix = _split_suffix(basename)
    token = token or uuid.uuid4().hex[:8]
    return os.path.join(
        directory, f".{stem}.asynccb-tmp-{pid or os.getpid()}-{token}{suffix}"
    )


def remove_temporaries(path: str, pid: int) -> list[str]:
    """Removes the temporary files that process `pid` left for `path` (it
    died mid-save). Returns the paths removed."""
    pattern = temporary_name(os.fspath(path), pid, token="*")
    removed = []
    for leftover in glob.glob(glob.escape(pattern).replace(
            glob.escape("*"), "*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(leftover)
            removed.append(leftover)
    return removed


def remove_in_progress() -> None:
    """Removes the temporary files this process is writing (it is about
    to exit without finishing them)."""
    for tmp in list(_in_progress):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
        if not directory:
            _drop_cached(fd)
    finally:
        os.close(fd)


def _drop_cached(fd: int) -> None:
    """Lets the kernel drop the file's pages from its cache (they are
    clean: just synced).

    A run's checkpoints are seldom read back by it, and kept cached they
    push out what is (the data set's files), and make every save take new
    pages: on a VM whose free memory goes back to its host (virtio-balloon
    free page reporting), a new page costs about ten times its copy, so a
    save that keeps its pages costs several times one that returns them for
    the next save to reuse.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:  # pragma: no cover - not on macOS or Windows.
        return
    # Advice: a file system that does not take it changes nothing, and the
    # file is already durable, so its refusal is not the save's error.
    with contextlib.suppress(OSError):
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path to write; on success it replaces `path`.

    The file is written under a hidden temporary name in the same
    directory, flushed to disk, then renamed over `path`, so readers and a
    crash at any moment see either the previous complete file or the new
    complete one, never a partial file. On failure the temporary file is
    removed and the previous file is untouched.

    Remote paths (`gs://`, `s3://`, ...) are yielded unchanged: their
    stores replace objects whole anyway, and a local rename cannot apply.
    """
    path = os.fspath(path)
    if "://" in path:
        yield path
        return
    tmp = temporary_name(path)
    _in_progress.add(tmp)
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    finally:
        _in_progress.discard(tmp)
    _fsync_path(os.path.dirname(os.path.abspath(path)), directory=True)


def save_target(filepath: Any, overwrite: bool) -> str:
    """The path a save writes, with its directory made.

    Raises:
        FileExistsError: If the file exists and `overwrite` is false.
    """
    filepath = os.fspath(filepath)
    if not overwrite and os.path.exists(filepath):
        raise FileExistsError(
            f"{filepath} exists and the save was called with overwrite=False."
        )
    directory = os.path.dirname(filepath)
    if directory and "://" not in filepath:
        os.makedirs(directory, exist_ok=True)
    return filepath


def save_atomically(model: Any, method: str, args: tuple, kwargs: dict,
                    then: Callable[[str], None] | None = None) -> None:
    """Calls `model.<method>(filepath, ...)` so the file appears atomically.

    Args:
        model: The (shadow) model to save.
        method: `"save"` or `"save_weights"`.
        args: The positional arguments of the original call; the first is
            the file path.
        kwargs: Its keyword arguments.
        then: Called with the temporary path once Keras wrote it, before it
            takes the file's name (to learn the file's layout).
    """
    filepath, *rest = args
    kwargs = dict(kwargs)
    filepath = save_target(filepath, kwargs.pop("overwrite", True))
    with atomic_path(filepath) as tmp:
        # The class' method: the instance's may be asynccb's own
        # (`asynccb._fast_saves.route_saves`), which calls this.
        getattr(type(model), method)(model, tmp, *rest, overwrite=True,
                                     **kwargs)
        if then is not None:
            then(tmp)


class OffloadedSavesModel:
    """Stands in for the live model in a callback whose saves are offloaded.

    `ModelCheckpoint` decides on the training thread when and where to save
    (cheap: counters, a comparison, a file name) and then calls
    `self.model.save(...)` or `self.model.save_weights(...)`, the slow part.
    With this stand-in as its model, those two calls snapshot the state and
    queue the save for a worker; everything else reads the live model.

    Args:
        model: The live model.
        submit_save: Called with `(method, args, kwargs)` instead of saving.
    """

    def __init__(self, model: Any, submit_save: Callable[[str, tuple, dict], None]):
        object.__setattr__(self, "_live_model", model)
        object.__setattr__(self, "_submit_save", submit_save)

    def save(self, *args: Any, **kwargs: Any) -> None:
        self._submit_save("save", args, kwargs)

    def save_weights(self, *args: Any, **kwargs: Any) -> None:
        self._submit_save("save_weights", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._live_model, name, value)

    def __repr__(self) -> str:
        return f"<OffloadedSavesModel of {self._live_model!r}>"
