"""The `process` executor: callbacks in the warm worker processes.

A forwarding thread per lane, in the training process, takes the lane's
tasks in order, runs each in the worker (`ProcessRunner`) and, between
tasks, waits on both the queue and the worker's sentinel: a worker that
dies while idle is noticed at once too.
"""

from __future__ import annotations

import os
from multiprocessing.connection import wait
from typing import Any

from asynccb._channel import CLOSED
from asynccb._lane import Lane
from asynccb._executors.placement import pin_this_thread
from asynccb._executors.process import pool
from asynccb._executors.process.runner import ProcessRunner, pickle_callback
from asynccb._executors.process.shared_memory import allocate_shared, free_kept
from asynccb._executors.thread import ThreadExecutor
from asynccb._snapshot import Buffer

__all__ = ["ProcessExecutor"]


def _forward(lane: Lane, runner: ProcessRunner) -> None:
    pin_this_thread()  # It pickles tasks and callbacks: work.
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    try:
        try:
            runner.start(lane.name)
        except BaseException as exc:
            lane.fail("worker start", exc)
        while True:
            task = lane.channel.get_or_arm(lambda: os.write(wake_write, b"!"))
            # Between tasks, watch the worker too (not once it has failed).
            sentinel = runner.sentinel if lane.error is None else None
            if task is None:
                ready = wait([wake_read] + ([sentinel] if sentinel is not None
                                            else []))
                if sentinel is not None and sentinel in ready:
                    lane.fail("worker (idle)", runner.death("idle"))
                if wake_read in ready:
                    os.read(wake_read, 4096)
                continue
            if task is CLOSED:
                break
            lane.run(task)
        if lane.error is None:
            try:
                runner.finish()
            except BaseException as exc:
                lane.fail("returning the callback's state", exc)
    finally:
        runner.stop()
        os.close(wake_read)
        os.close(wake_write)


class ProcessExecutor(ThreadExecutor):
    """Runs each lane in a worker process, fed by a forwarding thread (the
    lane's thread, as in the thread executor, but it forwards)."""

    name = "process"
    crosses_processes = True

    @staticmethod
    def allocate(nbytes: int) -> Buffer:
        return allocate_shared(nbytes)

    @classmethod
    def check(cls, callback: Any) -> None:
        pickle_callback(callback)  # Raises, naming what cannot travel.

    @classmethod
    def runner(cls, callback: Any, deferred_control: bool) -> ProcessRunner:
        return ProcessRunner(callback, deferred_control)

    @classmethod
    def shutdown(cls) -> None:
        pool.shutdown()  # The warm worker processes.

    @classmethod
    def process_ending(cls) -> None:
        # The snapshot segments kept for the next run: named files, which
        # only the resource tracker would remove, after the process.
        free_kept(closing=True)

    @staticmethod
    def serve(lane: Lane) -> None:
        runner = lane.runner
        assert isinstance(runner, ProcessRunner), runner  # From `runner`.
        _forward(lane, runner)
