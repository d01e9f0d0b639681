"""`Options`, the one place offloading options are checked, without
TensorFlow."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading

import pytest

from asynccb._options import Options


def test_defaults():
    options = Options()
    assert (options.executor, options.max_pending, options.on_full,
            options.max_snapshots) == (None, 16, "block", 2)


@pytest.mark.parametrize("kwargs", [
    {"executor": "thread"},
    {"max_pending": 1, "max_snapshots": 1},
    {"on_full": "drop_oldest"},
    {"on_full": "latest"},
    {"exit_grace": 0, "handle_sigterm": False},
    {"exit_grace": 2.5},
])
def test_accepts_good_values(kwargs):
    options = Options(**kwargs)
    for name, value in kwargs.items():
        assert getattr(options, name) == value


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"executor": "gpu"}, "`executor` must be one of 'thread', 'process', "
                              "'async'. Received: executor='gpu'"),
        ({"executor": 3}, "Received: executor=3"),
        ({"max_pending": 0}, "`max_pending` must be a positive integer. "
                             "Received: max_pending=0"),
        ({"max_pending": -3}, "Received: max_pending=-3"),
        ({"max_pending": 2.5}, "Received: max_pending=2.5"),
        ({"max_pending": True}, "Received: max_pending=True"),
        ({"max_pending": "4"}, "Received: max_pending='4'"),
        ({"max_snapshots": 0}, "`max_snapshots` must be a positive integer. "
                               "Received: max_snapshots=0"),
        ({"max_snapshots": None}, "Received: max_snapshots=None"),
        ({"on_full": "newest"}, "`on_full` must be one of 'block', "
                                "'drop_oldest', 'latest'. "
                                "Received: on_full='newest'"),
        ({"on_full": None}, "Received: on_full=None"),
        ({"exit_grace": -1}, "`exit_grace` must be a number of seconds, "
                             "zero or more. Received: exit_grace=-1"),
        ({"exit_grace": float("inf")}, "Received: exit_grace=inf"),
        ({"exit_grace": None}, "Received: exit_grace=None"),
        ({"exit_grace": True}, "Received: exit_grace=True"),
        ({"handle_sigterm": "yes"}, "`handle_sigterm` must be True or "
                                    "False. Received: handle_sigterm='yes'"),
    ],
)
def test_rejects_bad_values_naming_them(kwargs, message):
    with pytest.raises(ValueError) as caught:
        Options(**kwargs)
    assert message in str(caught.value)


def test_frozen():
    options = Options(max_pending=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.max_pending = 0  # What was checked stays what is used.
    assert options.max_pending == 4


def test_loads_without_tensorflow():
    # In a fresh interpreter: the test session may have loaded TensorFlow.
    code = ("import sys; from asynccb._options import Options; "
            "Options(executor='thread', max_pending=3); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow'; "
            "assert 'keras' not in sys.modules, 'keras'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("arguments, message", [
    ({"processes": 0}, "Received: processes=0"),
    ({"processes": True}, "Received: processes=True"),
    ({"processes": 1.5}, "Received: processes=1.5"),
    ({"idle_timeout": 0}, "Received: idle_timeout=0"),
    ({"idle_timeout": -5.0}, "Received: idle_timeout=-5.0"),
    ({"idle_timeout": "10"}, "Received: idle_timeout='10'"),
])
def test_configure_workers_rejects_bad_values(arguments, message):
    from asynccb import configure_workers

    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        configure_workers(**arguments)


@pytest.mark.parametrize("cpus", [set(), [10_000], ["0"], [True], 3])
def test_configure_workers_rejects_bad_cpus(cpus):
    from asynccb import configure_workers

    with pytest.raises(ValueError, match="Received: cpus="):
        configure_workers(cpus=cpus)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_configure_workers_takes_cpus_the_caller_is_not_pinned_to():
    """The training thread pinned to one CPU gives the workers another."""
    from asynccb import configure_workers

    first, second, *_ = sorted(os.sched_getaffinity(0))
    outcome = []

    def pinned_caller():
        os.sched_setaffinity(0, {first})
        try:
            configure_workers(cpus={second})
            outcome.append("accepted")
        except ValueError as exc:
            outcome.append(str(exc))
        finally:
            configure_workers()

    caller = threading.Thread(target=pinned_caller)
    caller.start()
    caller.join()
    assert outcome == ["accepted"]
