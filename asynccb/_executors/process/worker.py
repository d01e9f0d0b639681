"""The main function of a worker process (spawned, one per callback).

Started as `python -m asynccb._executors.process.worker <socket fd>
<lifeline fd>`
with an environment that hides accelerators and limits threads. It sets
itself up before TensorFlow loads (lower priority, deaf to Ctrl-C, which
the training process handles), then serves tasks from the training process until told to stop, or until the
training process dies: the lifeline pipe's end closes with it, and the
worker exits within moments.

Messages from the training process: a pickled envelope of a kind and
cloudpickled parts, each loaded in the worker where its errors are reported:
    ("init", (sys.path, deferred_control, capacity))
    ("blueprint", ModelBlueprint)      the shadow's source, when it changes
    ("task", Task, callback or None)   snapshot as a `SnapshotRef`; with
                                       `set_model`, the cloudpickled callback
    ("finish",)                        reply with the callback's state
    ("stop",)
Replies: ("ready",), ("done", effects), ("error", encoded exception),
("state", dict of picklable attributes).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Any

__all__ = [
    "main",
    "SnapshotRef",
    "USE_BLUEPRINT",
    "encode_exception",
    "decode_exception",
]

USE_BLUEPRINT = "<current blueprint>"  # A task's `model`: the last one sent.


@dataclass
class SnapshotRef:
    """A snapshot as a worker process sees it: a shared buffer by name.

    Has what `Shadow.apply` reads of a `Snapshot`.
    """

    name: str | None  # None for an empty layout (no buffer).
    layout: Any  # LayoutSpec
    stop_training: bool
    data: Any = None  # The mapped bytes, set in the worker.

    @property
    def level(self):
        return self.layout.level

    def arrays(self):
        return self.layout.views(self.data)

    def __getstate__(self):
        return {**self.__dict__, "data": None}


def _set_up_process() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(5)  # Training comes first when they compete for a core.
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.set_visible_devices([], "GPU")


def _exit_with_parent(lifeline: int) -> None:
    # Nothing is ever written to the lifeline: the read returns (empty)
    # when the training process closes it, by exiting or by dying. Then
    # exit at once, without leaving a half-written temporary file.
    os.read(lifeline, 1)
    from asynccb._saving import remove_in_progress

    remove_in_progress()
    os._exit(0)


def _qualified_name(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as str_exc:  # The user's `__str__` itself failed.
        return f"<str() raised {type(str_exc).__name__}: {str_exc}>"


EncodedException = tuple  # (pickled or None, type name, message, traceback)


def encode_exception(exc: BaseException) -> EncodedException:
    """`exc` as plain data that always crosses to the training process: the
    exception pickled (or `None` if it cannot be), its type's name, its
    message and its formatted traceback (which does not pickle).
    `decode_exception` puts them back together."""
    text = "".join(traceback.format_exception(type(exc), exc,
                                              exc.__traceback__))
    try:
        data = pickle.dumps(exc)
    except Exception:  # Rebuilt as a `RemoteError` from the rest.
        data = None
    return data, _qualified_name(type(exc)), _message(exc), text


def decode_exception(encoded: EncodedException) -> BaseException:
    """The worker's exception, with its traceback as a `RemoteTraceback`
    cause (as `concurrent.futures` does); a `RemoteError` holding its type
    name, message and traceback if it cannot be rebuilt here."""
    from asynccb._errors import RemoteError, RemoteTraceback

    data, type_name, message, text = encoded
    if data is None:
        return RemoteError(type_name, message, text,
                           "it could not be pickled in the worker")
    try:
        exc = pickle.loads(data)
    except Exception as load_exc:
        return RemoteError(
            type_name, message, text, "it could not be rebuilt in the "
            f"training process: {type(load_exc).__name__}: {load_exc}")
    exc.__cause__ = RemoteTraceback(text)
    return exc


def _callback_state(callback: Any) -> dict:
    """The callback's attributes that can travel back, but its model."""
    state = {}
    for name, value in vars(callback).items():
        if name == "_model":
            continue
        try:
            pickle.dumps(value)
        except Exception:
            continue  # Open files, writers: they stay the training side's.
        state[name] = value
    return state


def main(conn: Any, lifeline: int) -> None:
    """Serves one offloaded callback; see the module docstring."""
    threading.Thread(target=_exit_with_parent, args=(lifeline,),
                     daemon=True).start()
    _set_up_process()

    import numpy as np

    from asynccb._executors.process.shared_memory import SharedBuffers
    from asynccb._tasks import TaskRunner

    _, init = pickle.loads(conn.recv_bytes())
    path, deferred_control, capacity = pickle.loads(init)
    sys.path[:] = path  # Where the training process finds the user's code.
    runner = TaskRunner(None, deferred_control)
    buffers = SharedBuffers(capacity)
    blueprint_data, blueprint = None, None
    conn.send(("ready",))
    try:
        while True:
            # The envelope holds only names and bytes: it always loads.
            # What is inside may not (a class that does not import here, a
            # segment gone), so it is loaded where errors are reported.
            kind, *parts = pickle.loads(conn.recv_bytes())
            if kind == "stop":
                break
            if kind == "blueprint":
                blueprint_data, blueprint = parts[0], None
                continue
            if kind == "finish":
                conn.send(("state", _callback_state(runner.callback)
                           if runner.callback is not None else {}))
                continue
            task_data, callback_data = parts
            task = None
            try:
                task = pickle.loads(task_data)
                if task.model == USE_BLUEPRINT:
                    if blueprint is None:
                        blueprint = pickle.loads(blueprint_data)
                    task.model = blueprint
                snapshot = task.snapshot
                if snapshot is not None:
                    snapshot.data = (
                        np.empty(0, np.uint8) if snapshot.name is None
                        else buffers.array(snapshot.name,
                                           snapshot.layout.nbytes))
                if callback_data is not None:
                    runner.callback = pickle.loads(callback_data)
                effects = runner.run(task)
            except BaseException as exc:
                conn.send(("error", encode_exception(exc)))
            else:
                conn.send(("done", effects))
            finally:
                if task is not None:
                    task.snapshot = None
    finally:
        runner.close()
        buffers.close()
    # Asked to stop, with nothing left to do: skip the interpreter's
    # teardown (unloading TensorFlow takes seconds), which the training
    # process would otherwise wait for at the end of every run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    from multiprocessing.connection import Connection

    # Run as the importable module, not as `__main__`: the messages name its
    # classes (`SnapshotRef`), which would otherwise load it a second time,
    # mid-run.
    from asynccb._executors.process.worker import main as _main

    _main(Connection(int(sys.argv[1])), int(sys.argv[2]))
