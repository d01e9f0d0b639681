"""Queue policies of the lane channel, without TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from asynccb._channel import CLOSED, Channel


@dataclass
class Item:
    name: str
    droppable: bool = True
    snapshot: Any = None


def _fill(channel, *items):
    for item in items:
        channel.put(item)


def _drain(channel):
    taken = []
    while (item := channel.get()) is not CLOSED:
        taken.append(item.name)
        channel.done()
    return taken


def test_first_in_first_out_then_closed():
    channel = Channel(3)
    _fill(channel, Item("a"), Item("b"))
    channel.close()
    assert _drain(channel) == ["a", "b"]
    assert channel.high_water == 2


@pytest.mark.parametrize("policy, dropped, kept", [
    ("drop_oldest", ["begin"], ["save1", "end", "new"]),
    ("latest", ["save1"], ["begin", "end", "new"]),
])
def test_full_queue_policies(policy, dropped, kept):
    channel = Channel(3)
    _fill(channel, Item("begin"), Item("save1", snapshot=object()),
          Item("end"))
    blocked, victims = channel.make_room(policy, interrupted=lambda: False)
    assert [victim.name for victim in victims] == dropped
    assert blocked == 0.0
    channel.put(Item("new"))
    channel.close()
    assert _drain(channel) == kept


def test_undroppable_items_are_never_dropped():
    channel = Channel(1)
    channel.put(Item("on_train_begin", droppable=False))
    # Nothing droppable: every policy would wait; an interrupt ends it.
    blocked, victims = channel.make_room("drop_oldest",
                                         interrupted=lambda: True)
    assert victims == []
    channel.close()
    assert _drain(channel) == ["on_train_begin"]


def test_cancel_returns_what_was_pending():
    channel = Channel(4)
    _fill(channel, Item("a"), Item("b"))
    assert [item.name for item in channel.cancel()] == ["a", "b"]
    channel.close()
    assert channel.get() is CLOSED
