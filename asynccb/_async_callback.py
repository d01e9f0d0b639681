"""`AsyncCallback`: a wrapper that runs a callback off the training thread."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import keras

from asynccb._dispatcher import Dispatcher
from asynccb._executors import EXECUTORS, get_executor
from asynccb._hooks import call_hook, effective_hooks
from asynccb._lane import Lane
from asynccb._options import (
    DEFAULT_MAX_PENDING,
    DEFAULT_EXIT_GRACE,
    DEFAULT_MAX_SNAPSHOTS,
    Options,
    check_callback,
)
from asynccb._roles import (
    StateSpec,
    default_executor,
    is_control,
    model_changing_hooks,
)
from asynccb._saving import OffloadedSavesModel
from asynccb._snapshot import StateLevel
from asynccb._stats import CallbackStats

__all__ = ["AsyncCallback"]


def _save_submitter(dispatcher: Dispatcher, lane: Lane
                    ) -> Callable[[str, tuple, dict], None]:
    """What a saves-only callback's stand-in model calls instead of saving:
    queues the save on `lane`.

    It holds the dispatcher and the lane, not the wrapper: the dispatcher's
    finalizer (`Dispatcher.close_with`) keeps them alive until the wrapper
    is collected, so nothing they lead to may lead back to the wrapper, or
    neither it nor the model would ever be collected.
    """
    def submit(method: str, args: tuple, kwargs: dict) -> None:
        dispatcher.submit(lane, "save", method, args=args, kwargs=kwargs,
                          level=StateLevel.FULL)

    return submit


class AsyncCallback(keras.callbacks.Callback):
    """Runs a callback's hooks in a worker, off the training thread.

    Each hook of the wrapped callback is queued, in order, for a worker that
    runs it with a private copy of `logs`. The callback's `self.model` there
    is a *shadow* model holding a snapshot of the live model taken when the
    hook was called, so a checkpoint written at step k holds exactly step
    k's weights. The training thread pays only for the snapshot (a memory
    copy into reused buffers, and only for hooks that need the model) and
    for queueing.

    A `ModelCheckpoint` keeps its decisions (when to save, the file name,
    `best`) on the training thread and offloads only its saves, which
    appear atomically (temporary file, fsync, rename).

    At the end of the outermost `fit`/`evaluate`/`predict` every queued hook
    has run and the worker has stopped. An exception in a hook is raised on
    the training thread, at the next hook or at the end, as an
    `AsyncCallbackError` whose `__cause__` is the original exception.

    Args:
        callback: The `keras.callbacks.Callback` to run off the thread.
        executor: `"thread"` (a worker thread for this callback),
            `"process"` (a worker process: the callback is pickled once per
            run, the model rebuilt there, snapshots passed through shared
            memory; it stops competing with training for the GIL), or
            `"async"` (a task in an anyio event loop; `async def` hooks are
            awaited there, plain ones run on a thread of the callback's
            own).
            Defaults to `"process"` for a ModelCheckpoint or a
            BackupAndRestore (their saves) and `"thread"` for anything
            else (see the README's benchmark).
        max_pending: The most hooks that may wait in its queue.
        on_full: What a hook does when the queue (or the pool of snapshot
            buffers) is full: `"block"` waits for the worker (lossless),
            `"drop_oldest"` drops the oldest pending hook, `"latest"` drops
            the oldest pending hook that holds a snapshot, so the newest
            state wins. Drops are counted in `stats()` and logged.
        state: What model state the hooks need: `"none"`, `"scalars"`
            (optimizer iterations and learning rate), `"weights"` or
            `"full"` (weights and optimizer variables); a dict from hook
            name to level; or a function `(hook, args) -> level`. Defaults
            to what asynccb knows of Keras' built-ins, and to `"full"` for
            other callbacks. Declaring less makes snapshots cheaper.
        deferred_control: Allow offloading a callback that controls training
            (EarlyStopping, ReduceLROnPlateau, ...). Its `stop_training` or
            learning-rate change, made on the shadow, is applied to the live
            model at the first hook after the worker ran it: later than in
            plain Keras, by however far the worker lags.
        max_snapshots: The most snapshot buffers alive at once (memory
            bound: each holds one copy of the state the callback needs).
        fast_saves: Let model saves after the model's first one (`.keras`
            and `.weights.h5`) be written straight from the snapshot, in the
            file layout learned from Keras' own first save (kept for the
            model's next runs): the same file for about the cost of one
            copy of its bytes. `False` sends
            every save through Keras' writer. `stats()` counts each save's
            path and why Keras' was needed.
        exit_grace: When a run ends early (SIGTERM, an exception or
            `sys.exit` from a callback, Ctrl-C, a run left open whose
            callbacks are dropped or whose interpreter exits), the hooks
            already accepted are still run, for at most this many seconds;
            what is left then is listed on stderr (the files already
            written are intact).
        handle_sigterm: While a run is active (started on the main
            thread), SIGTERM first finishes the accepted hooks (within
            `exit_grace`), then takes its course: the previous handler is
            called if there was one, else the process ends with SIGTERM's
            status. `False` leaves SIGTERM alone.

    Example:

    ```python
    model.fit(
        x, y, epochs=10,
        callbacks=[
            AsyncCallback(keras.callbacks.ModelCheckpoint("ckpt.keras")),
            AsyncCallback(keras.callbacks.CSVLogger("log.csv")),
            keras.callbacks.EarlyStopping(patience=3),  # stays inline
        ],
    )
    ```
    """

    def __init__(
        self,
        callback: keras.callbacks.Callback,
        executor: str | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        on_full: str = "block",
        state: StateSpec | None = None,
        deferred_control: bool = False,
        max_snapshots: int = DEFAULT_MAX_SNAPSHOTS,
        fast_saves: bool = True,
        exit_grace: float = DEFAULT_EXIT_GRACE,
        handle_sigterm: bool = True,
    ):
        options = Options(
            executor=executor,
            max_pending=max_pending,
            on_full=on_full,
            max_snapshots=max_snapshots,
            fast_saves=fast_saves,
            exit_grace=exit_grace,
            handle_sigterm=handle_sigterm,
        )
        self._setup(callback, options, state, deferred_control)

    @classmethod
    def _with_options(
        cls, callback: keras.callbacks.Callback, options: Options
    ) -> AsyncCallback:
        """Wraps `callback` with `options` as they are: for an
        `AsyncCallbackList`, whose options were checked when it was made."""
        self = cls.__new__(cls)
        self._setup(callback, options, state=None, deferred_control=False)
        return self

    def _setup(
        self,
        callback: keras.callbacks.Callback,
        options: Options,
        state: StateSpec | None,
        deferred_control: bool,
    ) -> None:
        super().__init__()
        check_callback("callback", callback)
        if isinstance(callback, AsyncCallback):
            raise ValueError(
                "The callback is already an AsyncCallback; wrap the original "
                f"callback once. Received: callback={callback!r}"
            )
        executor = options.executor or default_executor(callback)
        kind = get_executor(executor)
        if is_control(callback) and not deferred_control:
            raise ValueError(
                f"{type(callback).__name__} controls training (it can stop "
                "it or change the learning rate or the weights), so it runs "
                "on the training thread: pass it unwrapped. To run it in a "
                "worker anyway, with its effect applied to the live model at "
                "a later hook, pass deferred_control=True. "
                f"Received: callback={type(callback).__name__}"
            )
        coroutine_hooks = sorted(
            hook for hook in effective_hooks(callback)
            if inspect.iscoroutinefunction(getattr(callback, hook))
        )
        if coroutine_hooks and not kind.runs_coroutines:
            awaiting = [name for name in EXECUTORS
                        if get_executor(name).runs_coroutines]
            raise ValueError(
                f"{type(callback).__name__} has `async def` hooks "
                f"({', '.join(coroutine_hooks)}), which the {executor!r} "
                "executor does not await: pass executor="
                f"{' or '.join(map(repr, awaiting))}. "
                f"Received: executor={executor!r}"
            )
        self.callback = callback
        self._lane = Lane(
            callback,
            executor=kind,
            max_pending=options.max_pending,
            on_full=options.on_full,
            state=state,
            deferred_control=deferred_control,
            fast_saves=options.fast_saves,
        )
        if not self._lane.saves_only:
            kind.check(callback)  # Fails now if it cannot run there.
        self._dispatcher = Dispatcher(options)
        self._dispatcher.add_lane(self._lane)
        self._owns_dispatcher = True
        self._closer = self._dispatcher.close_with(self)

    def __repr__(self) -> str:
        return (
            f"AsyncCallback({self.callback!r}, "
            f"executor={self._lane.executor!r})"
        )

    @property
    def executor(self) -> str:
        """The executor running this callback's hooks."""
        return self._lane.executor

    def stats(self) -> CallbackStats:
        """Counters and timings of this callback's offloaded hooks."""
        return self._lane.stats()

    def wait(self) -> None:
        """Blocks until every hook queued so far has run in the worker
        (for a process worker, that includes its start-up).

        Useful before reading what the callback writes while training goes
        on; the end of `fit` waits by itself.

        Raises:
            AsyncCallbackError: If an offloaded hook failed.
        """
        self._dispatcher.wait()

    def _bind(self, dispatcher: Dispatcher) -> None:
        """Joins the dispatcher of an `AsyncCallbackList`, which then owns
        the run's lifecycle and shares snapshots among its callbacks."""
        if dispatcher is self._dispatcher:
            return
        self._dispatcher.close()
        self._closer.detach()  # Its own dispatcher is done with.
        self._lane.on_failure = lambda: None
        dispatcher.add_lane(self._lane)
        self._dispatcher = dispatcher
        self._owns_dispatcher = False

    # Model and params.

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        lane = self._lane
        lane.live_model = model
        if lane.summaries is not None:
            lane.summaries.close()  # Keras' TensorBoard starts afresh too.
        if self._owns_dispatcher:
            self._dispatcher.set_model(model)
        if not lane.here:  # Another worker's than the chief's: its hooks
            lane.attached = True  # run inline if they must, else nowhere.
            if lane.inline_everywhere:
                self.callback.set_model(model)
            return
        if lane.saves_only:
            lane.offloaded_model = OffloadedSavesModel(
                model, _save_submitter(self._dispatcher, lane))
            self.callback.set_model(lane.offloaded_model)
            lane.offload_saves()
        else:
            lane.runner.prepare_callback()  # Before training: may raise.
        lane.attached = True
        self._dispatcher.submit(lane, "set_model", "set_model",
                                level=lane.setup_level)

    def set_params(self, params: Any) -> None:
        super().set_params(params)
        if not self._lane.here:
            if self._lane.inline_everywhere:
                self.callback.set_params(params)
        elif self._lane.saves_only:
            self.callback.set_params(params)
        else:
            self._dispatcher.submit(
                self._lane, "set_params", "set_params", args=(dict(params),)
            )

    # Dispatch.

    @functools.cached_property
    def inline_changing_hooks(self) -> frozenset[str]:
        """The hooks it runs inline (a saves-only callback runs all but
        its saves) that may change the model's variables: BackupAndRestore
        restores at `on_train_begin`."""
        if self._lane.saves_only:
            return model_changing_hooks(self.callback)
        return frozenset()

    def dispatch(self, hook: str, args: tuple, logs: Any) -> None:
        """Sends one hook call to the worker (or, for saves-only callbacks,
        runs its decision inline). Used as is by `AsyncCallbackList`."""
        lane = self._lane
        if not lane.here:
            if hook in lane.inline_everywhere:
                call_hook(self.callback, hook, args, logs)
            return
        if lane.summaries is not None:
            lane.summaries.hook(hook)
        if lane.saves_only:
            if hook in lane.waits_for_saves:
                self._dispatcher.finish_lane(lane)
            call_hook(self.callback, hook, args, logs)
        elif hook in lane.hooks:
            level = lane.needs(hook, args)
            self._dispatcher.submit(lane, "hook", hook, args, logs, level=level)

    def _hook(self, hook: str, args: tuple, logs: Any) -> None:
        if not self._owns_dispatcher:
            self.dispatch(hook, args, logs)  # The list frames the call.
            return
        with self._dispatcher.dispatching():
            self.dispatch(hook, args, logs)

    def _begin(self) -> None:
        if self._owns_dispatcher:
            self._dispatcher.begin()

    def _end(self) -> None:
        if self._owns_dispatcher:
            self._dispatcher.end()

    def on_train_begin(self, logs=None):
        self._begin()
        self._hook("on_train_begin", (), logs)

    def on_train_end(self, logs=None):
        self._hook("on_train_end", (), logs)
        self._end()

    def on_test_begin(self, logs=None):
        self._begin()
        self._hook("on_test_begin", (), logs)

    def on_test_end(self, logs=None):
        self._hook("on_test_end", (), logs)
        self._end()

    def on_predict_begin(self, logs=None):
        self._begin()
        self._hook("on_predict_begin", (), logs)

    def on_predict_end(self, logs=None):
        self._hook("on_predict_end", (), logs)
        self._end()

    def on_epoch_begin(self, epoch, logs=None):
        self._hook("on_epoch_begin", (epoch,), logs)

    def on_epoch_end(self, epoch, logs=None):
        self._hook("on_epoch_end", (epoch,), logs)

    def on_batch_begin(self, batch, logs=None):
        self._hook("on_batch_begin", (batch,), logs)

    def on_batch_end(self, batch, logs=None):
        self._hook("on_batch_end", (batch,), logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._hook("on_train_batch_begin", (batch,), logs)

    def on_train_batch_end(self, batch, logs=None):
        self._hook("on_train_batch_end", (batch,), logs)

    def on_test_batch_begin(self, batch, logs=None):
        self._hook("on_test_batch_begin", (batch,), logs)

    def on_test_batch_end(self, batch, logs=None):
        self._hook("on_test_batch_end", (batch,), logs)

    def on_predict_batch_begin(self, batch, logs=None):
        self._hook("on_predict_batch_begin", (batch,), logs)

    def on_predict_batch_end(self, batch, logs=None):
        self._hook("on_predict_batch_end", (batch,), logs)


AsyncCallback.__module__ = "asynccb"  # As users name it.
