"""A gate that works across threads and processes: a named pipe.

`threading.Event` cannot travel to a worker process; this can (only its
path is pickled). `set()` writes a byte (or a short message); `wait()`
blocks in `select` until one arrives, with a timeout as a failure guard.
Both ends open the pipe read-write, so neither blocks on the other being
there yet, and a byte written before the reader comes waits for it.
"""

from __future__ import annotations

import os
import select


class Signal:
    """A one-shot, cross-process event with an optional small payload.

    Args:
        path: Where to create the named pipe (in a test's `tmp_path`).
    """

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self._fd = None
        # Held open by the creating process (the test) so that a byte set
        # by a worker that exits at once is still there to be read.
        self._handle()

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
        return self._fd

    def open(self) -> None:
        """Opens the pipe now, rather than at first use (a test about to
        run a process out of file descriptors)."""
        self._handle()

    def set(self, payload: bytes = b"!") -> None:
        os.write(self._handle(), payload)

    def wait(self, timeout: float) -> bytes | None:
        """The payload once set; `None` after `timeout` seconds."""
        fd = self._handle()
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            return None
        payload = os.read(fd, 4096)
        os.write(fd, payload)  # Stays set for later waiters.
        return payload

    def __getstate__(self):
        return {"path": self.path, "_fd": None}

    @classmethod
    def attach(cls, path) -> "Signal":
        """The signal at `path`, created elsewhere (e.g. in a layer built
        from its config inside a worker)."""
        signal = cls.__new__(cls)
        signal.path, signal._fd = str(path), None
        return signal


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Waits (on a pidfd, no polling) until process `pid` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def children_of(pid: int) -> list[tuple[int, str]]:
    """The (pid, command line) of the live child processes of `pid`."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # It exited while we looked.
        children.append((int(entry), command))
    return children
