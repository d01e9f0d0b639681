"""The part of an offloaded TensorBoard that stays on the training thread.

Keras' TensorBoard, with `update_freq` other than `"epoch"`, makes its
writer TensorFlow's default summary writer around each step, with the step
number and a `record_if` condition, so that summaries a model writes itself
(`tf.summary.scalar` in a layer's `call`) are recorded. Those summaries run
inside the train function, on the training thread, and the default writer
is thread-local: the callback's copy in a worker cannot set it there. This
does, on the training thread, exactly as Keras does, with writers of its own
in the same run directories; everything the callback writes itself (epoch
and batch scalars, histograms, images, the model summary) is still written
by the worker.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

__all__ = ["InGraphSummaries", "in_graph_summaries"]

# Where Keras' TensorBoard writes each mode's events, under its `log_dir`.
_RUN_DIRECTORIES = {"train": "train", "test": "validation"}


class InGraphSummaries:
    """Sets the default summary writer, step and `record_if` on the
    training thread, at the hooks where Keras' TensorBoard does.

    Args:
        callback: The offloaded `keras.callbacks.TensorBoard`; its
            `log_dir` and `update_freq` are read at each run.
    """

    def __init__(self, callback: Any):
        self._callback = callback
        self._writers: dict[str, Any] = {}
        self._contexts: list[tuple[Any, Any]] = []
        # Global step per mode; Keras never resets the test one.
        self._steps = {"train": 0, "test": 0}
        self._thread: int | None = None  # Where the contexts were entered.

    def _writer(self, mode: str) -> Any:
        writer = self._writers.get(mode)
        if writer is None:
            import tensorflow as tf

            directory = os.path.join(str(self._callback.log_dir),
                                     _RUN_DIRECTORIES[mode])
            writer = self._writers[mode] = tf.summary.create_file_writer(
                directory)
        return writer

    def _push(self, mode: str) -> None:
        import tensorflow as tf

        step = self._steps[mode]
        update_freq = self._callback.update_freq
        contexts = (
            self._writer(mode).as_default(step),
            tf.summary.record_if(lambda: step % update_freq == 0),
        )
        contexts[0].__enter__()
        contexts[1].__enter__()
        self._contexts.append(contexts)
        self._thread = threading.get_ident()

    def _pop(self) -> None:
        if self._contexts:
            writer_context, record_context = self._contexts.pop()
            record_context.__exit__(*sys.exc_info())
            writer_context.__exit__(*sys.exc_info())

    def close(self) -> None:
        """Leaves every context and closes the writers (their events are
        on disk afterwards). Keras' `set_model` starts with fresh writers
        too.

        Contexts are thread-local: called from another thread (the run
        watch, after `fit` raised past its hooks), this only flushes, and
        leaves the training thread's default writer set, as Keras' own
        TensorBoard does when `fit` raises.
        """
        if self._contexts and self._thread != threading.get_ident():
            for writer in self._writers.values():
                writer.flush()
            return
        while self._contexts:
            self._pop()
        writers, self._writers = self._writers, {}
        for writer in writers.values():
            writer.close()

    def hook(self, hook: str) -> None:
        """Does, for `hook`, what Keras' TensorBoard does to the default
        writer (see `TensorBoard._push_writer` and its callers)."""
        if self._callback.update_freq == "epoch":
            return
        if hook == "on_train_begin":
            self._steps["train"] = 0
            self._push("train")
        elif hook in ("on_train_batch_begin", "on_test_batch_begin"):
            mode = "train" if hook == "on_train_batch_begin" else "test"
            self._steps[mode] += 1
            self._pop()
            self._push(mode)
        elif hook == "on_test_begin":
            self._push("test")
        elif hook == "on_test_end":
            self._pop()
            for writer in self._writers.values():
                writer.flush()
        elif hook == "on_train_end":
            self.close()


def in_graph_summaries(callback: Any) -> InGraphSummaries | None:
    """The training-thread part of `callback` if it is a TensorBoard."""
    import keras

    if isinstance(callback, keras.callbacks.TensorBoard):
        return InGraphSummaries(callback)
    return None
