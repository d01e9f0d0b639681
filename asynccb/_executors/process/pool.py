"""The warm worker processes, shared by every process-offloaded callback.

One worker process per training process (more with
`asynccb.configure_workers(processes=n)`) serves the lanes of every
`AsyncCallback` and `AsyncCallbackList` that offload to a process, each on
a thread of its own in the worker. A worker starts with the first lane
that needs it (on that lane's forwarding thread: the training thread never
waits for a TensorFlow import) and stays warm after the run, so a later
`fit` starts at once and finds its shadow models built. Workers stop after
`IDLE_TIMEOUT_S` (or the configured timeout) without a run, at interpreter
exit, or at `asynccb.shutdown()`; none outlives the training process (its
lifeline pipe closes with it).

Why not `multiprocessing.Pool` or loky's reusable executor: both hand
tasks to whichever worker is free, with no state kept between tasks, while
a lane is stateful (the callback object, its shadow, its mapped buffers)
and ordered (one callback's hooks run in call order), and every wait must
also watch the worker's death, which their futures report only as a
broken pool. Here a reader thread routes each reply to its lane's mailbox
and turns the worker's death into an error for every lane it served.
"""

from __future__ import annotations

import collections
import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection, wait
from typing import Any

from asynccb._errors import WorkerDiedError
from asynccb._executors import IDLE_TIMEOUT_S
from asynccb._kept_memory import Countdown
from asynccb._executors.placement import worker_cpus
from asynccb._executors.process import messages, shared_memory

__all__ = ["WorkerProcess", "acquire", "configure", "release", "shutdown"]

WORKER_MODULE = "asynccb._executors.process.worker"


_STOP_TIMEOUT_S = 30  # A worker told to stop is killed if still alive then.

# Read by TensorFlow when it loads in the worker: no accelerator (training
# owns it), one thread each (training owns the cores).
WORKER_ENVIRONMENT = {
    "PYTHONUNBUFFERED": "1",  # A callback's prints appear when printed.
    "CUDA_VISIBLE_DEVICES": "-1",
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    # Each lane's thread would get a malloc arena of its own, and keep in
    # it the memory its last save freed (Keras builds a file in memory):
    # with several checkpoints, a spent save's worth each.
    "MALLOC_ARENA_MAX": "2",
}


def _sentinel(pid: int) -> int | None:
    """A pidfd: readable when process `pid` exits (Linux 5.3+). Elsewhere
    `None`, and a death shows as the end of the worker's socket."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


_DIED = object()
"""Put in a lane's mailbox when the worker died (`died_error` says how)."""


class WorkerProcess:
    """One worker process, the lanes it serves, and their mailboxes.

    Starting it blocks the calling (forwarding) thread until the worker
    has imported TensorFlow and replied `Ready`.
    """

    def __init__(self, cpus: frozenset[int] | None = None) -> None:
        ours, theirs = socket.socketpair()
        lifeline_read, lifeline = os.pipe()
        self._lifeline: int | None = lifeline  # `None` once closed.
        self.cpus = cpus
        pinned = [",".join(map(str, sorted(cpus)))] if cpus else []
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE,
                 str(theirs.fileno()), str(lifeline_read), *pinned],
                pass_fds=(theirs.fileno(), lifeline_read),
                env={**os.environ, **WORKER_ENVIRONMENT},
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
            os.close(lifeline_read)
        self.pid = self.process.pid
        self.sentinel = _sentinel(self.pid)
        self.users = 0  # Lanes attached for a run; guarded by the pool.
        self.exitcode: int | None = None  # Set once it is found dead.
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._mailboxes: dict[int, queue.SimpleQueue] = {}
        # Lanes whose runner was collected: closed with the next message
        # sent (a finalizer may run anywhere, even inside `send`, so it
        # only appends here).
        self._closing: collections.deque[int] = collections.deque()
        self._next_lane = 0
        self._lock = threading.Lock()
        self._path = tuple(sys.path)
        try:
            self.send(messages.Init(self._path))
            ready = self._wait_reply()
            if not isinstance(ready, messages.Ready):
                raise self.died_error("starting")
        except BaseException:
            self.process.kill()
            self.process.wait()
            self._close_handles()
            raise
        self._reader = threading.Thread(
            target=self._read, name="asynccb-pool-reader", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.exitcode is None

    def _wait_reply(self) -> Any:
        ready = wait([self._conn] + ([self.sentinel] if self.sentinel else []))
        if self._conn in ready:
            try:
                return messages.decode(self._conn.recv_bytes())
            except (EOFError, OSError):
                pass  # Its end closed as it died.
        self.exitcode = self.process.wait()
        return None

    def _read(self) -> None:
        """Routes replies to their lanes until the worker is gone; then
        tells every lane it died."""
        while (reply := self._wait_reply()) is not None:
            mailbox = self._mailboxes.get(reply.lane)
            if mailbox is not None:
                mailbox.put(reply)
        with self._lock:
            for mailbox in self._mailboxes.values():
                mailbox.put(_DIED)

    def send(self, message: messages.ToWorker) -> None:
        with self._send_lock:
            while self._closing:
                number = self._closing.popleft()
                self._mailboxes.pop(number, None)
                self._conn.send_bytes(messages.encode(messages.Close(number)))
            self._conn.send_bytes(messages.encode(message))

    def follow_path(self) -> None:
        """Gives the worker the training process' `sys.path` if it changed
        since (a run can import what an earlier one could not)."""
        path = tuple(sys.path)
        if path != self._path:
            self._path = path
            self.send(messages.Init(path))

    def open_lane(self, deferred_control: bool, capacity: int) -> int:
        with self._lock:
            number = self._next_lane
            self._next_lane += 1
            mailbox: queue.SimpleQueue = queue.SimpleQueue()
            if not self.alive:
                mailbox.put(_DIED)
            self._mailboxes[number] = mailbox
        self.send(messages.Open(number, deferred_control, capacity))
        return number

    def close_lane(self, number: int) -> None:
        """Marks a lane closed; the worker hears it with the next message
        (or never, if it stops first: then there is nothing to close)."""
        self._closing.append(number)

    def receive(self, lane: int, doing: str, expected: type) -> Any:
        """The lane's next reply, of type `expected`; raises the worker's
        exception (`Failed`) or its death."""
        reply = self._mailboxes[lane].get()
        if reply is _DIED:
            self._mailboxes[lane].put(reply)  # For whatever asks next.
            raise self.died_error(doing)
        if isinstance(reply, messages.Failed):
            raise reply.error.rebuild()
        if not isinstance(reply, expected):
            raise RuntimeError(
                f"asynccb: worker process (pid {self.pid}) replied "
                f"{reply!r} while {doing}.")
        return reply

    def died_error(self, doing: str) -> WorkerDiedError:
        """The error for this worker, found dead while `doing` something."""
        exitcode = self.process.wait()
        self.exitcode = exitcode
        error = WorkerDiedError(
            f"worker process (pid {self.pid}) died while {doing}",
            exitcode=exitcode)
        how = (f"killed by {error.signal}" if error.signal
               else f"exit code {exitcode}")
        error.args = (f"{error.args[0]}: {how}",)
        return error

    def stop(self) -> None:
        """Stops the worker (asks, then kills) and closes its pipes. Only
        with no lane attached: a lane's forwarding thread may be waiting
        on its sentinel."""
        if self.process.poll() is None:
            try:
                self.send(messages.Stop())
            except OSError:
                pass  # It is exiting already; wait below.
            try:
                self.process.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join()
        self._close_handles()

    def _close_handles(self) -> None:
        self._conn.close()
        for handle in (self.sentinel, self._lifeline):
            if handle is not None:
                os.close(handle)
        self.sentinel = self._lifeline = None


class _Pool:
    """The training process' workers: started on demand, shared, warm.

    Lanes go to the worker that serves the fewest for the current runs (a
    new one while fewer than `processes` run), and a lane that served a
    worker before goes back to it: its shadow is there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: list[WorkerProcess] = []
        self._idle = Countdown("asynccb-pool-idle", self._expire)
        self.processes = 1
        self.idle_timeout: float | None = IDLE_TIMEOUT_S

    def acquire(self, previous: WorkerProcess | None = None) -> WorkerProcess:
        """A warm worker (started now if needed) attached for a run:
        `previous`, the lane's last one, while it is in service and no
        busier than the others."""
        with self._lock:
            self._cancel_idle()
            for dead in [w for w in self._workers if not w.alive]:
                self._workers.remove(dead)
                if not dead.users:  # Else its last lane's release stops it.
                    dead.stop()
            serving = self._serving()
            if len(serving) < self.processes and all(
                w.users for w in serving
            ):
                # Started under the lock: lanes starting together wait for
                # one TensorFlow import at a time, which on a machine that
                # trains is no slower than two at once.
                worker = WorkerProcess(worker_cpus())
                self._workers.append(worker)
            else:
                least = min(w.users for w in serving)
                worker = previous if (
                    previous in serving and previous.users == least
                ) else min(serving, key=lambda w: w.users)
            worker.users += 1
            return worker

    def release(self, worker: WorkerProcess) -> None:
        """Detaches a lane at the end of its run."""
        with self._lock:
            worker.users -= 1
            if worker.users:
                return
            # Dead, beyond a lowered `processes` or on other CPUs: its last
            # lane is done with it.
            retired = worker not in self._serving()
            if retired and worker in self._workers:
                self._workers.remove(worker)
            if not any(w.users for w in self._workers):
                self._arm_idle()
        if retired:
            worker.stop()  # Outside the lock: it may wait for the exit.

    def _serving(self) -> list[WorkerProcess]:
        """The workers new lanes may go to: alive, on the CPUs asked for,
        at most `processes`."""
        cpus = worker_cpus()
        return [w for w in self._workers
                if w.alive and w.cpus == cpus][:self.processes]

    def configure(self, processes: int, idle_timeout: float | None) -> None:
        """Sets how many workers serve the lanes of later runs and how long
        they stay warm without a run (`None`: until shutdown), and follows
        `placement`'s CPUs: stops now the idle workers no longer wanted,
        and restarts the idle countdown with the new timeout."""
        with self._lock:
            self.processes = processes
            self.idle_timeout = idle_timeout
            serving = self._serving()
            surplus = [w for w in self._workers
                       if w not in serving and not w.users]
            for worker in surplus:
                self._workers.remove(worker)
            self._cancel_idle()
            if not any(w.users for w in self._workers):
                self._arm_idle()
        for worker in surplus:
            worker.stop()

    def _arm_idle(self) -> None:
        """Starts the idle countdown (under the lock, with no lane
        attached), unless there is nothing to stop or no timeout."""
        if self.idle_timeout is None or not self._workers:
            return
        self._idle.start(self.idle_timeout)

    def _cancel_idle(self) -> None:
        self._idle.cancel()

    def _expire(self, timer: threading.Timer) -> None:
        with self._lock:
            if not self._idle.expired(timer):
                return
            workers, self._workers = self._workers, []
        # The snapshot buffers kept for them: removed first, so that they
        # are gone once the workers are (unmapped by their exit).
        shared_memory.free_kept()
        for worker in workers:
            worker.stop()

    def shutdown(self) -> None:
        with self._lock:
            if any(w.users for w in self._workers):
                raise RuntimeError(
                    "asynccb.shutdown() was called while a run uses the "
                    "worker process; call it after `fit` returns.")
            self._cancel_idle()
            workers, self._workers = self._workers, []
        shared_memory.free_kept()
        for worker in workers:
            worker.stop()


_pool = _Pool()
acquire = _pool.acquire
release = _pool.release
shutdown = _pool.shutdown
configure = _pool.configure
