"""Exceptions raised by asynccb."""

from __future__ import annotations

__all__ = ["AsyncCallbackError"]


class AsyncCallbackError(RuntimeError):
    """Raised on the training thread when an offloaded callback hook failed.

    The original exception, with the traceback of the worker that ran the
    hook, is this exception's `__cause__`.

    Attributes:
        callback_name: Name of the callback whose hook failed.
        hook: Name of the hook (or model method) that failed.
        pending: Descriptions of the hooks that were still queued for that
            callback and were cancelled because of the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        callback_name: str = "",
        hook: str = "",
        pending: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.callback_name = callback_name
        self.hook = hook
        self.pending = pending
