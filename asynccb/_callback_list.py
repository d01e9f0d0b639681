"""`AsyncCallbackList`: a `keras.callbacks.CallbackList` that offloads."""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import keras
from keras import tree

from asynccb._async_callback import AsyncCallback
from asynccb._dispatcher import Dispatcher
from asynccb._hooks import call_hook
from asynccb._options import (
    DEFAULT_MAX_PENDING,
    DEFAULT_EXIT_GRACE,
    DEFAULT_MAX_SNAPSHOTS,
    Options,
    check_callback,
    check_choice,
)
from asynccb._roles import is_control, is_known_slow, model_changing_hooks
from asynccb._stats import SampleMap, Stats, SyncCallbackStats

try:  # The function Keras' own CallbackList applies to every hook's logs.
    from keras.src.utils.python_utils import pythonify_logs
except ImportError:  # pragma: no cover - older Keras 3
    def pythonify_logs(logs):
        return dict(logs or {})

__all__ = ["AsyncCallbackList"]

logger = logging.getLogger("asynccb")


def _print_msg(message: str) -> None:
    """Prints like Keras' progress output: to stdout, or to logging when
    Keras' interactive logging is off."""
    if keras.config.is_interactive_logging_enabled():
        print(message, flush=True)
    else:
        logger.info(message)

# A synchronous hook slower than this share of its step (or epoch) gets a
# one-time warning suggesting AsyncCallback; hooks under the floor never do,
# so that microsecond jitter on tiny steps does not warn.
_SLOW_SHARE = 0.25
_SLOW_FLOOR_S = 1e-3

_STEP_HOOKS = {
    "on_train_batch_begin": "train",
    "on_test_batch_begin": "test",
    "on_predict_batch_begin": "predict",
}
_BATCH_HOOK_MODE = {
    "on_batch_begin": "train",
    "on_batch_end": "train",
    "on_train_batch_begin": "train",
    "on_train_batch_end": "train",
    "on_test_batch_begin": "test",
    "on_test_batch_end": "test",
    "on_predict_batch_begin": "predict",
    "on_predict_batch_end": "predict",
}


class AsyncCallbackList(keras.callbacks.CallbackList):
    """A `keras.callbacks.CallbackList` that runs slow callbacks off-thread.

    A drop-in for `keras.callbacks.CallbackList`, in `fit`, `evaluate` and
    `predict` and in hand-written training loops. Callbacks wrapped in
    `AsyncCallback` run in workers; with `offload="auto"` the known-slow
    built-ins (`ModelCheckpoint`, `CSVLogger`, `TensorBoard`,
    `RemoteMonitor`) are wrapped automatically. Everything else, and always
    the callbacks that control training (`EarlyStopping`,
    `ReduceLROnPlateau`, `History`, ...), runs inline, in list order, as in
    Keras.

    Offloaded callbacks that need the model at the same hook share one
    snapshot. The workers start with the first `on_*_begin` and are drained
    and stopped at the last `on_*_end`; a validation pass inside `fit` does
    not drain. Each synchronous callback is timed, and one whose hook takes
    more than a quarter of its step or epoch gets a one-time warning.

    Args:
        callbacks: List of `keras.callbacks.Callback` instances.
        add_history: Whether to add a `History` callback if there is none.
        add_progbar: Whether to add a `ProgbarLogger` if there is none.
        model: The `Model` these callbacks are used with.
        offload: `"auto"` to also offload the known-slow built-ins,
            `"explicit"` to offload only callbacks wrapped in
            `AsyncCallback`.
        executor: The executor for auto-offloaded callbacks; by default,
            each gets its kind's (`"process"` for ModelCheckpoint, else
            `"thread"`).
        max_pending: Queue bound for auto-offloaded callbacks.
        on_full: Full-queue policy for auto-offloaded callbacks.
        max_snapshots: The most snapshot buffers alive at once, shared by
            all offloaded callbacks of the list.
        fast_saves: Whether the saves of the callbacks it offloads may be
            written straight from snapshots (see `AsyncCallback`).
        exit_grace: The most seconds a run ending early (SIGTERM, an
            exception, `sys.exit`, Ctrl-C, a run left open) spends
            finishing the hooks it accepted (see `AsyncCallback`).
        handle_sigterm: Whether a SIGTERM during a run finishes the
            accepted hooks before taking its course (see `AsyncCallback`).
        **params: Parameters passed to each callback via `set_params`.

    Example:

    ```python
    callbacks = AsyncCallbackList(
        [keras.callbacks.ModelCheckpoint("ckpt/{epoch:02d}.keras"),
         keras.callbacks.CSVLogger("log.csv"),
         keras.callbacks.EarlyStopping(patience=3)],
        add_history=True, add_progbar=True, model=model,
        epochs=10, steps=steps, verbose=1,
    )
    model.fit(x, y, epochs=10, callbacks=callbacks)
    print(callbacks.stats())
    ```
    """

    def __init__(
        self,
        callbacks: Any = None,
        add_history: bool = False,
        add_progbar: bool = False,
        model: Any = None,
        *,
        offload: str = "auto",
        executor: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_full: str = "block",
        max_snapshots: int = DEFAULT_MAX_SNAPSHOTS,
        fast_saves: bool = True,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        handle_sigterm: bool = True,
        **params: Any,
    ):
        check_choice("offload", offload, ("auto", "explicit"))
        self._offload = offload
        self._options = Options(
            executor=executor,
            max_pending=max_pending,
            on_full=on_full,
            max_snapshots=max_snapshots,
            fast_saves=fast_saves,
            exit_grace=exit_grace,
            handle_sigterm=handle_sigterm,
        )
        self._dispatcher = Dispatcher(self._options)
        self._sync_times: dict[int, tuple[Any, SampleMap]] = {}
        self._changing: dict[int, frozenset] = {}
        self._warned: set[int] = set()
        self._step_start: dict[str, float] = {}
        self._step_s: dict[str, float] = {}
        self._epoch_start = 0.0
        self._epoch_s = 0.0
        callbacks = [self._adopt(cb) for cb in tree.flatten(callbacks or [])]
        super().__init__(callbacks, add_history, add_progbar, model, **params)
        self._dispatcher.close_with(self)

    # Membership.

    def _adopt(self, callback: Any) -> Any:
        check_callback("callbacks", callback)
        if isinstance(callback, AsyncCallback):
            callback._bind(self._dispatcher)
            return callback
        if self._offload == "auto" and is_known_slow(callback):
            wrapped = AsyncCallback._with_options(callback, self._options)
            wrapped._bind(self._dispatcher)
            return wrapped
        return callback

    def append(self, callback: Any) -> None:
        """Adds a callback at the end, offloading it as the list would."""
        callback = self._adopt(callback)
        self.callbacks.append(callback)
        if self.model is not None:
            callback.set_model(self.model)
        if self.params:
            callback.set_params(self.params)

    def _is_offloaded(self, callback: Any) -> bool:
        return isinstance(callback, AsyncCallback) and (
            callback._dispatcher is self._dispatcher
        )

    def set_model(self, model: Any) -> None:
        if model:
            self._dispatcher.set_model(model)
        super().set_model(model)

    # Stats.

    def stats(self) -> Stats:
        """Counters and timings of the offloaded and synchronous callbacks.

        Returns:
            A `Stats`; `print(stats)` shows a readable summary.
        """
        synchronous = {}
        for callback, samples in self._sync_times.values():
            name = type(callback).__name__
            key, number = name, 2
            while key in synchronous:
                key, number = f"{name}#{number}", number + 1
            synchronous[key] = SyncCallbackStats(key, samples.timings())
        return Stats(
            callbacks=self._dispatcher.lane_stats(),
            synchronous=synchronous,
            snapshots=self._dispatcher.snapshots,
            snapshot_bytes=self._dispatcher.snapshot_bytes,
            buffers=self._dispatcher.pool.high_water,
        )

    def wait(self) -> None:
        """Blocks until every hook queued so far, for every offloaded
        callback of the list, has run (for process workers, that includes
        their start-up). The end of `fit` waits by itself.

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        self._dispatcher.wait()

    # Dispatch.

    def _call(self, hook: str, args: tuple, logs: Any) -> None:
        dispatcher = self._dispatcher
        logs = pythonify_logs(logs)
        with dispatcher.dispatching():
            for callback in self.callbacks:
                if self._is_offloaded(callback):
                    callback.dispatch(hook, args, logs)
                    if hook in callback.inline_changing_hooks:
                        dispatcher.end_dispatch()  # As below.
                    continue
                start = time.perf_counter()
                call_hook(callback, hook, args, logs)
                self._record(callback, hook, time.perf_counter() - start)
                if hook in self._changing_hooks(callback):
                    # It may have changed the weights: later offloaded
                    # callbacks of this hook need a fresh snapshot.
                    dispatcher.end_dispatch()

    def _changing_hooks(self, callback: Any) -> frozenset:
        key = id(callback)
        hooks = self._changing.get(key)
        if hooks is None:
            hooks = self._changing[key] = model_changing_hooks(callback)
        return hooks

    def _record(self, callback: Any, hook: str, seconds: float) -> None:
        entry = self._sync_times.get(id(callback))
        if entry is None:
            entry = self._sync_times[id(callback)] = (callback, SampleMap())
        entry[1].add(hook, seconds)
        if seconds < _SLOW_FLOOR_S or id(callback) in self._warned:
            return
        if hook in _BATCH_HOOK_MODE:
            reference, what = self._step_s.get(_BATCH_HOOK_MODE[hook]), "step"
        elif hook == "on_epoch_end":
            reference, what = time.perf_counter() - self._epoch_start, "epoch"
        elif hook == "on_epoch_begin":
            reference, what = self._epoch_s, "epoch"
        else:
            return
        if reference and seconds > _SLOW_SHARE * reference and not is_control(
            callback
        ):
            self._warned.add(id(callback))
            name = type(callback).__name__
            warnings.warn(
                f"{name}.{hook} took {seconds * 1e3:.1f} ms, "
                f"{seconds / reference:.0%} of its {what} "
                f"({reference * 1e3:.1f} ms), on the training thread. Wrap "
                f"it as AsyncCallback({name}(...)) to run it in a worker.",
                stacklevel=3,
            )

    def _mark_step(self, hook: str) -> None:
        mode = _STEP_HOOKS.get(hook)
        if mode is not None:
            now = time.perf_counter()
            previous = self._step_start.get(mode)
            if previous is not None:
                self._step_s[mode] = now - previous
            self._step_start[mode] = now

    def _begin(self, hook: str, logs: Any) -> None:
        self._check_model()
        self._dispatcher.begin()
        self._call(hook, (), logs)

    def _check_model(self) -> None:
        """Raises before the run if offloaded callbacks need a model and the
        list has none: Keras gives its model to the callback lists it
        makes, not to one it is given, and the callbacks would fail later,
        in their workers."""
        if self._dispatcher.model is not None:
            return
        needing = [lane.name for lane in self._dispatcher.lanes
                   if lane.uses_model]
        if needing:
            raise ValueError(
                f"AsyncCallbackList has no model, and {', '.join(needing)} "
                "need one. `fit`, `evaluate` and `predict` do not give their "
                "model to a callback list they are passed: pass it when you "
                "make the list, `AsyncCallbackList(callbacks, model=model, "
                "...)`. Received: model=None"
            )

    def _end(self, hook: str, logs: Any) -> None:
        self._call(hook, (), logs)
        for mode in ("train", "test", "predict"):
            if hook == f"on_{mode}_end":
                self._step_start.pop(mode, None)
        self._dispatcher.end()

    # The Callback API.

    def on_train_begin(self, logs=None):
        self._begin("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._end("on_train_end", logs)
        verbose = (self.params or {}).get("verbose", 0)
        if verbose and verbose != 0 and self._dispatcher.lanes:
            _print_msg(str(self.stats()))

    def on_test_begin(self, logs=None):
        self._begin("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._end("on_test_end", logs)

    def on_predict_begin(self, logs=None):
        self._begin("on_predict_begin", logs)

    def on_predict_end(self, logs=None):
        self._end("on_predict_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._call("on_epoch_begin", (epoch,), logs)

    def on_epoch_end(self, epoch, logs=None):
        self._call("on_epoch_end", (epoch,), logs)
        self._epoch_s = time.perf_counter() - self._epoch_start

    def on_batch_begin(self, batch, logs=None):
        self._call("on_batch_begin", (batch,), logs)

    def on_batch_end(self, batch, logs=None):
        self._call("on_batch_end", (batch,), logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._mark_step("on_train_batch_begin")
        self._call("on_train_batch_begin", (batch,), logs)

    def on_train_batch_end(self, batch, logs=None):
        self._call("on_train_batch_end", (batch,), logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._mark_step("on_test_batch_begin")
        self._call("on_test_batch_begin", (batch,), logs)

    def on_test_batch_end(self, batch, logs=None):
        self._call("on_test_batch_end", (batch,), logs)

    def on_predict_batch_begin(self, batch, logs=None):
        self._mark_step("on_predict_batch_begin")
        self._call("on_predict_batch_begin", (batch,), logs)

    def on_predict_batch_end(self, batch, logs=None):
        self._call("on_predict_batch_end", (batch,), logs)


AsyncCallbackList.__module__ = "asynccb"  # As users name it.
