"""The `async` executor: `async def` hooks awaited in an anyio event loop of
its own, whether or not the training thread runs an event loop."""

from __future__ import annotations

import threading

import anyio
import keras
import pytest
from conftest import make_model, mnist_like

from asynccb import AsyncCallback


class AsyncUploader(keras.callbacks.Callback):
    """An uploader: its epoch hook is a coroutine, its batch hook is not."""

    def __init__(self):
        super().__init__()
        self.epochs = []
        self.batches = 0
        self.hook_threads = {}

    async def on_epoch_end(self, epoch, logs=None):
        await anyio.lowlevel.checkpoint()  # A real await, in a real loop.
        self.hook_threads["on_epoch_end"] = threading.current_thread().name
        anyio.get_current_task()  # Raises outside of an event loop.
        self.epochs.append((epoch, round(logs["loss"], 6)))

    def on_train_batch_end(self, batch, logs=None):
        self.hook_threads["on_train_batch_end"] = threading.current_thread().name
        self.batches += 1


def _fit(uploader):
    x, y = mnist_like(128)
    history = make_model().fit(
        x, y, epochs=3, batch_size=32, verbose=0, shuffle=False,
        callbacks=[AsyncCallback(uploader, executor="async", state="none")],
    )
    return history


def test_coroutine_hooks_are_awaited_in_the_loop():
    uploader = AsyncUploader()
    history = _fit(uploader)
    assert uploader.epochs == [
        (epoch, round(loss, 6)) for epoch, loss in
        zip(history.epoch, history.history["loss"])
    ]
    assert uploader.batches == 3 * 4
    threads = uploader.hook_threads
    assert threads["on_epoch_end"] != "MainThread"
    # Plain hooks do not block the loop: they run in anyio's threads.
    assert threads["on_train_batch_end"] != threads["on_epoch_end"]


@pytest.mark.asyncio
async def test_fit_inside_a_running_event_loop():
    """A notebook or an async app: the caller's loop is busy running fit;
    the executor's own loop runs the hooks."""
    uploader = AsyncUploader()
    caller_thread = threading.current_thread().name
    _fit(uploader)
    assert len(uploader.epochs) == 3
    assert uploader.hook_threads["on_epoch_end"] != caller_thread


@pytest.mark.asyncio
async def test_fit_in_a_worker_thread_of_an_async_app():
    uploader = AsyncUploader()
    await anyio.to_thread.run_sync(_fit, uploader)
    assert [epoch for epoch, _ in uploader.epochs] == [0, 1, 2]


def test_coroutine_hooks_need_the_async_executor():
    with pytest.raises(ValueError, match=r"has `async def` hooks "
                                         r"\(on_epoch_end\).*executor='async'"):
        AsyncCallback(AsyncUploader(), executor="thread")
