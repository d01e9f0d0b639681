"""Contract 5 and 6: the training thread does not wait for slow hooks; the
queue is bounded, and a full queue blocks or drops as asked."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like
from recording import Gated, LiveWeights, OnTrainEnd, WaitsAtEpochBegin

from asynccb import AsyncCallback, AsyncCallbackList

EPOCHS = 5


def _fit(callbacks):
    x, y = mnist_like(128)
    return make_model().fit(x, y, epochs=EPOCHS, batch_size=32, verbose=0,
                            shuffle=False, callbacks=callbacks)


def test_slow_hook_does_not_block_training(executor, signals):
    gate = signals("gate")
    slow = Gated(gate)
    live = LiveWeights()  # Inline: counts the epochs trained.

    def release():
        # Every epoch trained while the worker sat on its first hook.
        assert sorted(live.weights) == list(range(EPOCHS))
        assert slow.done == []
        gate.set()

    _fit([live, OnTrainEnd(release),
          AsyncCallback(slow, executor=executor, state="none")])
    assert slow.done == list(range(EPOCHS))


def test_block_policy_makes_training_wait(executor, signals):
    gate = signals("gate")
    slow = Gated(gate, gated_epochs={0})
    wrapper = AsyncCallback(slow, executor=executor, max_pending=1,
                            on_full="block", state="none")

    def release_when_blocked():
        # Epoch 0 runs in the worker, epoch 1 waits in the queue, and the
        # end of epoch 2 has nowhere to go: the training thread blocks.
        blocked.append(wrapper._lane.channel.wait_producer_blocked(
            JOIN_TIMEOUT_S))
        gate.set()

    blocked: list[bool] = []
    helper = threading.Thread(target=release_when_blocked)
    helper.start()
    try:
        _fit([wrapper])
    finally:
        gate.set()
        helper.join()
    assert blocked == [True]
    stats = wrapper.stats()
    assert stats.blocked.total_s > 0
    assert stats.dropped == 0
    assert slow.done == list(range(EPOCHS))  # Lossless.
    assert stats.queue_high_water <= 1 + 2  # One hook, plus the setup.


@pytest.mark.parametrize("form", ["AsyncCallback", "AsyncCallbackList"])
def test_latest_policy_keeps_newest_snapshot(executor, form, signals):
    gate, started = signals("gate"), signals("started")
    slow = Gated(gate, gated_epochs={0}, started=started)
    live = LiveWeights()
    wrapper = AsyncCallback(slow, executor=executor, max_pending=1,
                            on_full="latest", state="weights")

    def release():
        assert slow.done == []  # Still stuck on epoch 0.
        gate.set()

    callbacks = [OnTrainEnd(release), WaitsAtEpochBegin(started), live,
                 wrapper]
    if form == "AsyncCallbackList":
        model = make_model()
        x, y = mnist_like(128)
        callbacks = AsyncCallbackList(callbacks, model=model, add_history=True)
        model.fit(x, y, epochs=EPOCHS, batch_size=32, verbose=0,
                  shuffle=False, callbacks=callbacks)
    else:
        _fit(callbacks)
    last = EPOCHS - 1
    # Epoch 0 was running; each newer epoch end replaced the pending one.
    assert slow.done == [0, last]
    assert wrapper.stats().dropped == last - 1
    # The shadow held exactly the state of the epoch it was dispatched at.
    for epoch in (0, last):
        for got, want in zip(slow.weights[epoch], live.weights[epoch]):
            np.testing.assert_array_equal(got, want)


def test_drop_oldest_policy(executor, signals):
    gate, started = signals("gate"), signals("started")
    slow = Gated(gate, gated_epochs={0}, started=started)
    wrapper = AsyncCallback(slow, executor=executor, max_pending=2,
                            on_full="drop_oldest", state="none")
    _fit([OnTrainEnd(lambda: gate.set()), WaitsAtEpochBegin(started),
          wrapper])
    # 0 running, 1..4 arrive at a queue of 2: 1 and 2 are dropped.
    assert slow.done == [0, 3, 4]
    assert wrapper.stats().dropped == 2


def test_snapshot_pool_bounds_memory(executor, signals):
    """Snapshots live in at most `max_snapshots` reused buffers."""
    gate, started = signals("gate"), signals("started")
    slow = Gated(gate, gated_epochs={0}, started=started)
    wrapper = AsyncCallback(slow, executor=executor, max_pending=8,
                            on_full="latest", state="weights",
                            max_snapshots=2)
    _fit([OnTrainEnd(lambda: gate.set()), WaitsAtEpochBegin(started),
          wrapper])
    # A queue of 8 could hold 5 snapshots; the pool of 2 made the newest
    # snapshot replace the pending one instead.
    assert slow.done == [0, EPOCHS - 1]
    assert wrapper._dispatcher.pool.high_water == 2
