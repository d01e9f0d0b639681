"""The main function of a worker process (spawned, one per callback).

Started as `python -m asynccb._process_worker <socket fd> <lifeline fd>`
with an environment that hides accelerators and limits threads. It sets
itself up before TensorFlow loads (lower priority, deaf to Ctrl-C, which
the training process handles), then serves tasks from the training process until told to stop, or until the
training process dies: the lifeline pipe's end closes with it, and the
worker exits within moments.

Messages (cloudpickled) from the training process:
    ("init", sys.path, deferred_control, capacity)
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


def encode_exception(exc: BaseException) -> tuple[bytes, str]:
    """`exc` pickled, with its formatted traceback (which does not pickle);
    a `RuntimeError` naming its type stands in if it cannot be pickled.
    `decode_exception` puts them back together."""
    text = "".join(traceback.format_exception(type(exc), exc,
                                              exc.__traceback__))
    try:
        return pickle.dumps(exc), text
    except Exception:  # The user's exception type cannot travel.
        return pickle.dumps(RuntimeError(f"{type(exc).__qualname__}: {exc}")), text


def decode_exception(encoded: tuple[bytes, str]) -> BaseException:
    """The worker's exception, with its traceback as a `RemoteTraceback`
    cause (as `concurrent.futures` does)."""
    from asynccb._errors import RemoteTraceback

    data, text = encoded
    exc = pickle.loads(data)
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

    from asynccb._shared_memory import SharedBuffers
    from asynccb._tasks import TaskRunner

    _, path, deferred_control, capacity = pickle.loads(conn.recv_bytes())
    sys.path[:] = path  # Where the training process finds the user's code.
    runner = TaskRunner(None, deferred_control)
    buffers = SharedBuffers(capacity)
    blueprint = None
    conn.send(("ready",))
    try:
        while True:
            message = pickle.loads(conn.recv_bytes())
            kind = message[0]
            if kind == "stop":
                break
            if kind == "blueprint":
                blueprint = pickle.loads(message[1])
                continue
            if kind == "finish":
                conn.send(("state", _callback_state(runner.callback)
                           if runner.callback is not None else {}))
                continue
            _, task, payload = message
            if task.model == USE_BLUEPRINT:
                task.model = blueprint
            snapshot = task.snapshot
            if snapshot is not None:
                snapshot.data = np.empty(0, np.uint8) if snapshot.name is None \
                    else buffers.array(snapshot.name, snapshot.layout.nbytes)
            try:
                if payload is not None:  # E.g. its class cannot import here.
                    runner.callback = pickle.loads(payload)
                effects = runner.run(task)
            except BaseException as exc:
                conn.send(("error", encode_exception(exc)))
            else:
                conn.send(("done", effects))
            finally:
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

    main(Connection(int(sys.argv[1])), int(sys.argv[2]))
