"""The run watch's view of the threads' stacks, without TensorFlow."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# What the watch does a few times a second, with the collector made to run
# at every allocation and garbage that frees `threading.local` objects:
# a plain `sys._current_frames()` deadlocks there on CPython 3.11.
_WATCHING = textwrap.dedent("""
    import gc, sys, threading
    from asynccb._run_watch import {call}
    gc.set_threshold(1)
    stop = threading.Event()
    def busy():
        while not stop.is_set():
            (lambda: None)()
    threads = [threading.Thread(target=busy) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(3000):
        local = threading.local()
        local.x = 1
        cycle = [local]
        cycle.append(cycle)
        del local, cycle
        frames = {call}()
        assert threading.main_thread().ident in frames
    stop.set()
    for thread in threads:
        thread.join()
    assert gc.isenabled()
    print("done")
""")

# A guard, not a synchronisation: the loop takes well under a second; a
# deadlock never ends.
_HANG_GUARD_S = 60


def test_reading_the_stacks_cannot_deadlock_in_a_collection():
    done = subprocess.run(
        [sys.executable, "-c", _WATCHING.format(call="thread_frames")],
        capture_output=True, text=True, timeout=_HANG_GUARD_S)
    assert (done.returncode, done.stdout.strip()) == (0, "done"), done.stderr
