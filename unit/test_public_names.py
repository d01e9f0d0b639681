"""Public classes show, and pickle, as `asynccb.<Name>`: the names users
import and catch. (Those importable without TensorFlow.)"""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

import asynccb

LIGHT = ["AsyncCallbackError", "WorkerDiedError", "ControlFromWorkerError",
         "StateLevel", "Stats", "CallbackStats", "SyncCallbackStats",
         "Timing"]


@pytest.mark.parametrize("name", LIGHT)
def test_public_class_shows_as_asynccb(name):
    cls = getattr(asynccb, name)
    assert f"{cls.__module__}.{cls.__qualname__}" == f"asynccb.{name}"


def test_errors_and_levels_pickle_by_their_public_name():
    error = asynccb.ControlFromWorkerError("stopped from a worker")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is asynccb.ControlFromWorkerError
    assert back.args == error.args
    assert pickle.loads(pickle.dumps(asynccb.StateLevel.FULL)) is (
        asynccb.StateLevel.FULL)


def test_they_load_without_tensorflow():
    # In a fresh interpreter: the test session may have loaded TensorFlow.
    code = ("import sys, asynccb; "
            + "; ".join(f"asynccb.{name}" for name in LIGHT)
            + "; assert 'tensorflow' not in sys.modules, 'loaded'")
    subprocess.run([sys.executable, "-c", code], check=True)
