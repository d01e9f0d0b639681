"""The worker protocol's round trips, without TensorFlow."""

from __future__ import annotations

import pickle
import threading

import pytest

from asynccb._errors import RemoteError, RemoteTraceback
from asynccb._executors.process import messages


@pytest.mark.parametrize("message", [
    messages.Init(("/a", "/b")),
    messages.Open(7, True, 3),
    messages.Blueprint(7, b"\x80blueprint"),
    messages.RunTask(7, b"task", None),
    messages.RunTask(7, b"task", b"callback"),
    messages.Finish(7),
    messages.Close(7),
    messages.Stop(),
    messages.Ready(),
    messages.Done(7, {"stop_training": True, "learning_rate": 0.5}),
    messages.State(7, {"best": pickle.dumps(0.25)},
                   {"writer": "ValueError: closed"}),
], ids=lambda message: type(message).__name__)
def test_every_message_round_trips(message):
    assert messages.decode(messages.encode(message)) == message


def _raised(exc):
    try:
        raise exc
    except BaseException as raised:
        return raised


class NeedsTwoArguments(Exception):
    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


class HoldsALock(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def test_exception_comes_back_with_its_type_and_traceback():
    report = messages.ExceptionReport.of(_raised(KeyError("missing")))
    sent = messages.decode(messages.encode(messages.Failed(7, report)))
    exc = sent.error.rebuild()
    assert type(exc) is KeyError and exc.args == ("missing",)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "_raised" in exc.__cause__.text
    assert exc.__cause__.text.rstrip().endswith("KeyError: 'missing'")


@pytest.mark.parametrize("exc, reason", [
    (NeedsTwoArguments("no luck", "epoch 3"),
     "could not be rebuilt in the training process: TypeError"),
    (HoldsALock("locked"), "could not be pickled in the worker"),
])
def test_exception_that_cannot_be_rebuilt_keeps_what_is_known(exc, reason):
    report = messages.ExceptionReport.of(_raised(exc))
    rebuilt = messages.decode(messages.encode(messages.Failed(7, report))) \
        .error.rebuild()
    assert isinstance(rebuilt, RemoteError)
    assert rebuilt.type_name == f"{__name__}.{type(exc).__qualname__}"
    assert rebuilt.message == str(exc)
    assert reason in rebuilt.reason
    text = str(rebuilt)
    assert text.startswith(f"{rebuilt.type_name}: {exc}")
    assert "Traceback in the worker:" in text and "raise exc" in text


def test_exception_whose_str_fails():
    class BadStr(Exception):
        def __str__(self):
            raise RuntimeError("no text")

    report = messages.ExceptionReport.of(_raised(BadStr()))
    assert report.message == "<str() raised RuntimeError: no text>"


def test_snapshot_reference_travels_without_its_mapping():
    ref = messages.SnapshotRef("asynccb-1-abc", layout="layout",
                               stop_training=True, serial=7,
                               data=b"mapped bytes")
    back = pickle.loads(pickle.dumps(ref))
    assert (back.name, back.layout, back.stop_training, back.serial,
            back.data) == ("asynccb-1-abc", "layout", True, 7, None)
    assert ref.data == b"mapped bytes"  # The sender's copy is untouched.
