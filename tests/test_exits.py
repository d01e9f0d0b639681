"""Contract 12: nothing accepted is lost, however a run ends.

A checkpoint whose hook has returned to Keras is on disk in plain Keras;
in asynccb it is queued. SIGTERM (a preempted job), `sys.exit`, an
exception, Ctrl-C and interpreter exit must all finish it first, within
`exit_grace`; past the grace the files written are intact and what was not
done is listed on stderr.

The SIGTERM and interpreter-exit cases run a real training process
(`exits_child.py`) and send it real signals; saves wait at a gate (a named
pipe) so that they pile up queued, and the test opens it after the signal.
"""

from __future__ import annotations

import signal
import subprocess
import logging
import sys
import threading
import time
from pathlib import Path

import keras
import pytest
from conftest import JOIN_TIMEOUT_S, make_model, mnist_like, shared_segments
from crossproc import Signal, children_of, wait_for_exit
from exits_child import SAVE_EVERY, Announce
from gated import gated_model, load_gated

from asynccb import AsyncCallback, AsyncCallbackList

TESTS = Path(__file__).resolve().parent
CHILD = TESTS / "exits_child.py"
EXIT_TIMEOUT_S = 120  # Failure guard only: the child exits on its own.


class Child:
    """A training process of `exits_child.py`, read line by line."""

    def __init__(self, tmp_path: Path, *args: str, gated: bool = True,
                 hold: bool = False):
        self.dir = tmp_path / "ckpt"
        self.dir.mkdir()
        self.gate = Signal(tmp_path / "gate.fifo")
        self.stderr_path = tmp_path / "stderr.txt"
        command = [sys.executable, str(CHILD), "--dir", str(self.dir),
                   *args]
        if gated:
            command += ["--gate", self.gate.path]
        if hold:  # Never opened: the child waits there for a signal.
            command += ["--hold", str(Signal(tmp_path / "hold.fifo").path)]
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self.due: list[str] = []
        self.lines: list[str] = []

    def read_until(self, word: str) -> None:
        """Reads stdout until the line `word` (fails at its end)."""
        for line in self.process.stdout:
            line = line.strip()
            self.lines.append(line)
            if line.startswith("due "):
                self.due.append(line[4:])
            if line == word:
                return
        pytest.fail(f"the child ended before {word!r}: {self.stderr()}")

    def finish(self) -> int:
        """Waits for the exit; reads the rest of stdout; the exit code."""
        rest, _ = self.process.communicate(timeout=EXIT_TIMEOUT_S)
        self.read_lines(rest)
        return self.process.returncode

    def read_lines(self, text: str) -> None:
        for line in text.splitlines():
            self.lines.append(line)
            if line.startswith("due "):
                self.due.append(line[4:])

    def stderr(self) -> str:
        """All of it: a tail could cut the message a test looks for when
        the traceback above it is long (long paths on CI)."""
        return self.stderr_path.read_text()

    def files(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir())

    def helpers(self) -> list[int]:
        """Its child processes (worker, resource tracker), while alive."""
        return [pid for pid, _ in children_of(self.process.pid)]


def _assert_all_due_written(child: Child, in_flight: int = 0) -> None:
    # Every checkpoint handed over is there, complete; nothing else is
    # (no temporary file) but, if the signal came while asynccb was
    # queueing one, that one (accepted, so finished too).
    files = child.files()
    assert set(child.due) <= set(files), child.stderr()
    assert len(files) <= len(child.due) + in_flight, files
    for name in files:
        load_gated(child.dir / name)


def _assert_nothing_left(child: Child, helpers: list[int]) -> None:
    for pid in helpers:
        assert wait_for_exit(pid, JOIN_TIMEOUT_S), f"process {pid} left"
    assert not shared_segments(child.process.pid)
    # Removed by asynccb, not by the resource tracker after the process
    # (segments kept for a next run included).
    assert "leaked shared_memory" not in child.stderr()


@pytest.fixture(scope="module")
def sigterm_status(tmp_path_factory):
    """How plain Keras' training process ends on SIGTERM (the reference)."""
    child = Child(tmp_path_factory.mktemp("plain"), "--plain", gated=False,
                  hold=True)
    child.read_until("ready")
    child.process.send_signal(signal.SIGTERM)
    return child.finish()


@pytest.mark.parametrize("executor", ["thread", "process", "async"])
def test_sigterm_finishes_every_checkpoint_handed_over(
        tmp_path, executor, sigterm_status):
    child = Child(tmp_path, "--executor", executor, "--due", "12", hold=True)
    child.read_until("ready")  # 12 due, all waiting at the gate.
    helpers = child.helpers()
    child.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    child.gate.set()
    status = child.finish()
    took = time.monotonic() - signalled
    assert status == sigterm_status == -signal.SIGTERM, child.stderr()
    assert len(child.due) == 12
    _assert_all_due_written(child)
    _assert_nothing_left(child, helpers)
    print(f"{executor}: SIGTERM to exit with 12 saves queued: {took:.2f} s")


def test_sigterm_while_training_waits_on_a_full_queue(tmp_path):
    """The signal may land while the training thread is inside asynccb
    (waiting for room in the queue): it is handled when asynccb's code is
    done, the checkpoint it was queueing included."""
    child = Child(tmp_path, "--executor", "process", "--due", "2",
                  "--max-pending", "2")
    # 1 save at the gate and 1 queued hold both snapshot buffers: the
    # third checkpoint waits for one, in asynccb.
    child.read_until("ready")
    helpers = child.helpers()
    child.process.send_signal(signal.SIGTERM)
    child.gate.set()
    assert child.finish() == -signal.SIGTERM, child.stderr()
    assert len(child.due) == 2
    _assert_all_due_written(child, in_flight=1)
    _assert_nothing_left(child, helpers)


@pytest.mark.parametrize("waiting_for", ["queue", "snapshots"])
def test_sigterm_past_the_grace_while_training_waits_to_queue(
        tmp_path, waiting_for):
    """A hook waiting (in asynccb, on the training thread) for room that
    never comes: at the grace's end the process ends, and that hook,
    never accepted, is listed with what was not done."""
    bounds = (["--max-pending", "1", "--max-snapshots", "3"]
              if waiting_for == "queue" else
              ["--max-pending", "8", "--max-snapshots", "2"])
    # The first save waits at the gate, which stays shut; the second
    # holds the queue's one place (or the second snapshot buffer).
    child = Child(tmp_path, "--executor", "thread", "--due", "2",
                  "--grace", "0.5", "--say-blocked", *bounds)
    child.read_until(f"blocked {waiting_for}")
    child.process.send_signal(signal.SIGTERM)
    assert child.finish() == -signal.SIGTERM, child.stderr()
    assert child.files() == []  # The first save's temporary file too.
    listed = child.stderr().split("this was not done: ")[1]
    assert f"{child.due[0]}') (running)" in listed, listed
    assert f"{child.due[1]}')" in listed, listed
    assert "01-012.keras') (not queued)" in listed, listed


def test_a_second_ctrl_c_discards_what_has_not_started(tmp_path):
    """Ctrl-C finishes the accepted saves; a second Ctrl-C while asynccb
    waits for them discards the queued ones (listed), waits for the one
    being written, and ends as Ctrl-C does."""
    child = Child(tmp_path, "--list", "--due", "3", "--say-blocked",
                  hold=True)
    child.read_until("ready")  # 3 due: 1 at the gate, 2 queued.
    child.process.send_signal(signal.SIGINT)
    child.read_until("blocked queue")  # Finishing them: the gate is shut.
    child.process.send_signal(signal.SIGINT)
    child.read_until("listed")
    child.gate.set()  # The running save may end now.
    assert child.finish() == -signal.SIGINT, child.stderr()
    assert child.files() == child.due[:1], child.lines
    load_gated(child.dir / child.due[0])
    stderr = child.stderr()
    assert "the run ended by a second interrupt" in stderr, stderr
    listed = stderr.split("this was not done: ")[1]
    for name in child.due[1:]:
        assert f"{name}')" in listed, listed
    assert "KeyboardInterrupt" in stderr


def test_sigterm_ends_the_wait_for_a_running_save_after_ctrl_c(tmp_path):
    """Past Ctrl-C's grace asynccb waits for the save being written (a
    thread cannot be stopped safely); a SIGTERM meanwhile bounds that wait
    by its own grace, and the process ends as SIGTERM does."""
    child = Child(tmp_path, "--list", "--due", "3", "--grace", "1",
                  "--say-blocked", hold=True)
    child.read_until("ready")  # 3 due: 1 at the gate, 2 queued.
    child.process.send_signal(signal.SIGINT)
    child.read_until("listed")  # The grace ran out; the gate stays shut.
    child.process.send_signal(signal.SIGTERM)
    assert child.finish() == -signal.SIGTERM, child.stderr()
    assert child.files() == []  # The running save's temporary file too.
    listed = child.stderr().split("the run ended by SIGTERM")[1]
    assert f"{child.due[0]}') (running)" in listed, listed


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_sigterm_past_the_grace_lists_what_was_not_written(
        tmp_path, executor):
    child = Child(tmp_path, "--executor", executor, "--due", "4",
                  "--grace", "0.5", hold=True)
    child.read_until("ready")
    helpers = child.helpers()
    child.process.send_signal(signal.SIGTERM)  # The gate stays shut.
    assert child.finish() == -signal.SIGTERM, child.stderr()
    _assert_nothing_left(child, helpers)
    # The first save was caught mid-file: no file, no temporary file.
    assert child.files() == []
    stderr = child.stderr()
    assert "the run ended by SIGTERM" in stderr, stderr
    listed = stderr.split("this was not done: ")[1]
    for name in child.due:
        assert f"model.save('{child.dir / name}')" in listed
    if executor == "thread":  # A worker process may still be starting.
        assert f"{child.due[0]}') (running)" in listed


def test_sigterm_calls_the_users_handler_once_the_work_is_done(tmp_path):
    child = Child(tmp_path, "--executor", "thread", "--due", "6",
                  "--own-handler", hold=True)
    child.read_until("ready")
    child.process.send_signal(signal.SIGTERM)
    child.gate.set()
    child.read_until("handler 6")  # It ran with the 6 files on disk.
    Signal.attach(tmp_path / "hold.fifo").set()  # Training goes on...
    assert child.finish() == 0, child.stderr()  # ...and its handler ends it.
    assert "returned" in child.lines
    _assert_all_due_written(child)


@pytest.mark.parametrize("grace", ["60", "0.5"])
@pytest.mark.parametrize("kept", [False, True], ids=["dropped", "kept"])
def test_a_run_left_open(tmp_path, grace, kept):
    """A hand-written loop that never calls `on_train_end`: the queued
    saves are finished (or, past the grace, listed) when its callbacks
    are dropped, or, if the script keeps them, at interpreter exit."""
    child = Child(tmp_path, "--executor", "process", "--due", "5",
                  "--open-run", "--grace", grace, *(["--keep"] if kept else []))
    child.read_until("leaving")
    helpers = child.helpers()
    if grace == "60":
        child.gate.set()
    assert child.finish() == 0, child.stderr()
    _assert_nothing_left(child, helpers)
    if grace == "60":
        _assert_all_due_written(child)
        # Finished through its lane, which nothing closed before.
        assert "Traceback" not in child.stderr(), child.stderr()
    else:
        assert child.files() == []
        why = ("interpreter exit" if kept else
               "its callbacks being dropped without `on_train_end`")
        assert f"the run ended by {why};" in child.stderr(), child.stderr()


def _join_asynccb_threads():
    """Waits for asynccb's threads of the run (not the warm pool's)."""
    for thread in threading.enumerate():
        if thread.name.startswith("asynccb") and not thread.name.startswith(
                "asynccb-pool"):
            thread.join(JOIN_TIMEOUT_S)
            assert not thread.is_alive(), thread.name


class RaiseWhenReady(Announce):
    """Opens the saves' gate, then raises `exception`: the run ends with
    the due checkpoints queued behind the first."""

    def __init__(self, due, gate, exception, open_gate=True):
        super().__init__(due, None)
        self.gate, self.exception, self.open_gate = gate, exception, open_gate

    def ready(self):
        if self.open_gate:
            self.gate.set()
        raise self.exception("a callback failed")


def _due_names(count):
    return [f"01-{SAVE_EVERY * (n + 1):03d}.keras" for n in range(count)]


@pytest.mark.filterwarnings("ignore:RaiseWhenReady")  # Its timing.
@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt,
                                       ValueError])
@pytest.mark.parametrize("form", ["AsyncCallbackList", "Keras' list"])
def test_an_exception_from_a_callback_finishes_the_queued_saves(
        tmp_path, executor, exception, form, signals):
    gate = signals("gate")
    model = gated_model(gate.path)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{epoch:02d}-{batch:03d}.keras"),
        save_freq=SAVE_EVERY)
    callbacks = [AsyncCallback(checkpoint, executor=executor,
                               max_pending=32, max_snapshots=32),
                 RaiseWhenReady(6, gate, exception)]
    if form == "AsyncCallbackList":
        callbacks = AsyncCallbackList(callbacks, model=model,
                                      max_snapshots=32)
    x, y = mnist_like(SAVE_EVERY * 8 * 8)
    with pytest.raises(exception):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                  callbacks=callbacks)
    if form == "Keras' list":
        # Keras calls no end hook: the run watch finishes the run.
        _join_asynccb_threads()
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".keras")
    assert names == _due_names(6)
    for name in names:
        load_gated(tmp_path / name)


@pytest.mark.filterwarnings("ignore:RaiseWhenReady")
def test_a_fit_right_after_one_that_raised_comes_after_its_saves(
        tmp_path, executor, signals):
    # Keras' next `fit` calls `set_model` before any begin hook, while the
    # run watch of the fit that raised may be stopping that run's workers:
    # the new run must close it first, not queue to it.
    gate = signals("gate")
    model = gated_model(gate.path)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{epoch:02d}-{batch:03d}.keras"),
        save_freq=SAVE_EVERY)
    wrapped = AsyncCallback(checkpoint, executor=executor, max_pending=32,
                            max_snapshots=32)
    x, y = mnist_like(SAVE_EVERY * 8 * 8)
    with pytest.raises(ValueError):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                  callbacks=[wrapped, RaiseWhenReady(6, gate, ValueError)])
    wrapped.set_model(model)  # What Keras' next fit does first.
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".keras")
    assert names == _due_names(6)
    model.fit(x[:SAVE_EVERY * 8], y[:SAVE_EVERY * 8], batch_size=8,
              epochs=2, verbose=0, shuffle=False, callbacks=[wrapped])
    assert (tmp_path / f"02-{SAVE_EVERY:03d}.keras").exists()


def test_a_run_giving_up_at_exit_leaves_another_runs_save_alone(
        tmp_path, signals):
    # At interpreter exit the open runs are closed one by one; one whose
    # grace ran out must not remove the temporary file of a save another
    # run is still writing (only the process' last act does).
    runs = []
    for name in ("a", "b"):
        gate, started = signals(f"gate-{name}"), signals(f"started-{name}")
        model = gated_model(gate.path, started=started.path)
        directory = tmp_path / name
        directory.mkdir()
        checkpoint = keras.callbacks.ModelCheckpoint(
            str(directory / "model.keras"), save_freq=1)
        callbacks = AsyncCallbackList(
            [AsyncCallback(checkpoint, executor="thread")], model=model,
            exit_grace=0.2)
        callbacks.on_train_begin()
        callbacks.on_epoch_begin(0)
        callbacks.on_train_batch_end(0)
        assert started.wait(JOIN_TIMEOUT_S)  # Mid-file, at its gate.
        runs.append((gate, directory, callbacks))
    (gate_a, directory_a, run_a), (gate_b, directory_b, run_b) = runs
    try:
        run_a._dispatcher.close(grace=0.2, exiting=True)  # It gives up.
        gate_b.set()
        run_b.on_train_end()  # Its save is renamed into place.
        load_gated(directory_b / "model.keras")
        # The save given up on, still running, is not sabotaged either.
        gate_a.set()
        run_a.on_train_end()
        load_gated(directory_a / "model.keras")
    finally:
        for gate, _, run in runs:
            gate.set()
            run._dispatcher.close()


class _OpensTheGateOnTheList(logging.Handler):
    """Opens the gate once asynccb has listed what it gave up on, so the
    save caught at the gate can end."""

    def __init__(self, gate):
        super().__init__(logging.ERROR)
        self.gate = gate
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())
        self.gate.set()


@pytest.mark.filterwarnings("ignore:RaiseWhenReady")
def test_an_exception_past_the_grace_lists_what_was_not_done(
        tmp_path, signals):
    gate = signals("gate")
    model = gated_model(gate.path)
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{epoch:02d}-{batch:03d}.keras"),
        save_freq=SAVE_EVERY)
    callbacks = AsyncCallbackList(
        [AsyncCallback(checkpoint, executor="thread", max_pending=32,
                       max_snapshots=32),
         RaiseWhenReady(5, gate, ValueError, open_gate=False)],
        model=model, max_snapshots=32, exit_grace=0.2)
    listing = _OpensTheGateOnTheList(gate)
    logging.getLogger("asynccb").addHandler(listing)
    try:
        x, y = mnist_like(SAVE_EVERY * 8 * 8)
        with pytest.raises(ValueError, match="a callback failed"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      shuffle=False, callbacks=callbacks)
    finally:
        logging.getLogger("asynccb").removeHandler(listing)
    (message,) = listing.records
    assert "the run ended by an exception" in message
    due = _due_names(5)
    # The running save was waited for; the 4 queued ones were not run.
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".keras")
    assert names == due[:1]
    for number, name in enumerate(due):
        assert f"{name}')" + (" (running)" if number == 0 else "") in message
    assert callbacks.stats().callbacks["ModelCheckpoint"].cancelled == 4


class SeesTheHandler(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.during = signal.getsignal(signal.SIGTERM)


@pytest.mark.parametrize("handle_sigterm", [True, False])
def test_the_sigterm_handler_is_there_only_during_a_run(
        tmp_path, handle_sigterm):
    before = signal.getsignal(signal.SIGTERM)
    seer = SeesTheHandler()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    x, y = mnist_like(32)
    make_model().fit(x, y, epochs=1, verbose=0, callbacks=[
        AsyncCallback(checkpoint, executor="thread",
                      handle_sigterm=handle_sigterm), seer])
    assert (seer.during is not before) == handle_sigterm
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_on_another_thread_leaves_sigterm_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seer = SeesTheHandler()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    x, y = mnist_like(32)
    model = make_model()
    trainer = threading.Thread(target=lambda: model.fit(
        x, y, epochs=1, verbose=0,
        callbacks=[AsyncCallback(checkpoint, executor="thread"), seer]))
    trainer.start()
    trainer.join(JOIN_TIMEOUT_S)
    assert seer.during is before
    assert (tmp_path / "m.keras").exists()
