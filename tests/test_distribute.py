"""asynccb under tf.distribute (issue 12): MirroredStrategy on one host;
MultiWorkerMirroredStrategy, two workers on loopback, where only the chief
does the offloaded work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artifacts import assert_same_checkpoints, tensorboard_scalars
from conftest import shared_segments

TESTS = Path(__file__).resolve().parent
EXAMPLES = TESTS.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
from multi_worker import free_ports  # noqa: E402


@pytest.fixture(scope="module")
def mirrored_runs(tmp_path_factory):
    """The same fit under MirroredStrategy (two logical CPUs), plain and
    offloaded on each executor, in a process of its own: the example."""
    out = tmp_path_factory.mktemp("mirrored")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "mirrored_fit.py"), "--directory",
         str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoints equal to plain Keras' under 2 "
                             "replicas") == 3, done.stdout
    return out


@pytest.mark.parametrize("executor", ["thread", "process", "async"])
def test_mirrored_strategy_writes_what_plain_keras_writes(
        mirrored_runs, executor):
    plain, ours = mirrored_runs / "plain", mirrored_runs / executor
    compared = assert_same_checkpoints(plain, ours)  # Same names too.
    assert {"01.keras", "02.keras"} <= set(compared)
    assert sum(name.endswith(".weights.h5") for name in compared) == 5
    assert (ours / "log.csv").read_text() == (plain / "log.csv").read_text()
    assert tensorboard_scalars(ours / "tb") == tensorboard_scalars(plain / "tb")


def _start_cluster(mode: str, out: Path, *args: str) -> list:
    """Two workers on loopback running `multiworker_child.py MODE`."""
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    for index in range(2):
        config = {"cluster": cluster, "task": {"type": "worker",
                                               "index": index}}
        workers.append(subprocess.Popen(
            [sys.executable, str(TESTS / "multiworker_child.py"), mode,
             str(out), *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": json.dumps(config)}))
    return workers


def _cluster_run(mode: str, out: Path) -> list[dict]:
    reports = []
    for worker in _start_cluster(mode, out):
        stdout, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-3000:]
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    return reports


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster")
    return {mode: (_cluster_run(mode, out / mode), out / mode)
            for mode in ("plain", "asynccb")}


def test_multi_worker_the_chief_writes_what_plain_keras_writes(
        cluster_runs):
    (_, plain), (_, ours) = cluster_runs["plain"], cluster_runs["asynccb"]
    assert len(assert_same_checkpoints(plain / "worker0",
                                       ours / "worker0")) == 2
    assert ((ours / "worker0" / "log.csv").read_text()
            == (plain / "worker0" / "log.csv").read_text())


def test_multi_worker_the_other_worker_does_nothing_of_it(cluster_runs):
    plain = cluster_runs["plain"][1]
    reports, ours = cluster_runs["asynccb"]
    # Plain Keras 3: every worker writes every file.
    assert sorted(p.name for p in (plain / "worker1").iterdir()) == [
        "e01.weights.h5", "e02.weights.h5", "epochs.txt", "log.csv"]
    chief, other = reports
    # Only what a callback declared it needs on every worker.
    assert [p.name for p in (ours / "worker1").iterdir()] == ["epochs.txt"]
    assert (ours / "worker1" / "epochs.txt").read_text() == "0\n1\n"
    assert other["snapshots"] == 0
    assert other["dispatched"].pop("WorkerLocalLog") > 0
    assert set(other["dispatched"].values()) == {0}
    assert other["threads"] == ["asynccb-WorkerLocalLog"]
    assert other["worker_processes"] == 0
    # The chief did the work: its snapshots, its worker process.
    assert chief["snapshots"] >= 2 and chief["worker_processes"] == 1
    assert chief["dispatched"]["ModelCheckpoint"] >= 2


def test_multi_worker_early_stopping_stops_every_worker_at_once(
        cluster_runs):
    for reports, _ in cluster_runs.values():
        assert [r["stopped_epoch"] for r in reports] == [1, 1]
        assert [r["epochs_run"] for r in reports] == [2, 2]


def test_multi_worker_a_worker_killed_mid_run(tmp_path):
    """Worker 1 is SIGKILLed at the start of epoch 1: the chief's next
    collective fails (TensorFlow's heartbeats notice, about 10 s here;
    the bound: 120 s), its loop raises, and asynccb finishes the run at
    exit: its files are intact, nothing of it is left."""
    chief, other = _start_cluster("asynccb", tmp_path, "die")
    other.communicate(timeout=120)
    assert other.returncode == -signal.SIGKILL
    killed = time.monotonic()
    _, stderr = chief.communicate(timeout=120)
    took = time.monotonic() - killed
    assert chief.returncode == 1, stderr[-3000:]
    assert "UnavailableError" in stderr and "KeyError" not in stderr
    print(f"the chief failed {took:.1f} s after the other worker died")
    assert sorted(p.name for p in (tmp_path / "worker0").iterdir()) == [
        "e01.weights.h5", "epochs.txt", "log.csv"]
    assert not shared_segments(chief.pid)
