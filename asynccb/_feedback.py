"""What lanes hand back to the training thread: failures and control."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable

from asynccb._errors import AsyncCallbackError, WorkerDiedError

if TYPE_CHECKING:  # pragma: no cover
    from asynccb._lane import Lane

__all__ = ["apply_deferred_control", "log_late_failures", "raise_failure"]

logger = logging.getLogger("asynccb")


def raise_failure(lanes: Iterable[Lane]) -> None:
    """Raises the first failure recorded by `lanes`; logs the others.

    Raises:
        WorkerDiedError: If the lane's worker process died.
        AsyncCallbackError: If an offloaded hook raised; the hook's
            exception is its `__cause__`.
    """
    failures = [
        (lane, failure) for lane in lanes
        if (failure := lane.take_error()) is not None
    ]
    if not failures:
        return
    (lane, (exc, task, cancelled)), *others = failures
    for other, (other_exc, other_task, _) in others:
        logger.error("asynccb: %s.%s also failed.", other.name,
                     other_task, exc_info=other_exc)
    queued = (f" (cancelled, still queued: {', '.join(cancelled)})"
              if cancelled else "")
    if isinstance(exc, WorkerDiedError):
        # Its own message says how the worker died; no cause to chain.
        raise WorkerDiedError(
            f"{lane.name}: {exc}{queued}", exitcode=exc.exitcode,
            callback_name=lane.name, hook=task, pending=tuple(cancelled),
        ) from None
    message = (
        f"{lane.name}.{task} failed in its {lane.executor} worker: "
        f"{type(exc).__name__}: {exc}{queued}"
    )
    raise AsyncCallbackError(
        message, callback_name=lane.name, hook=task,
        pending=tuple(cancelled), original=exc,
    ) from exc


def log_late_failures(lanes: Iterable[Lane]) -> None:
    """Logs failures no training thread will see (its run is over)."""
    for lane in lanes:
        failure = lane.take_error()
        if failure is not None:
            exc, task, _ = failure
            logger.error("asynccb: %s.%s failed after the run ended.",
                         lane.name, task, exc_info=exc)


def apply_deferred_control(lane: Lane) -> None:
    """Applies to the live model the control effects (stop training, a new
    learning rate) that `lane`'s callback made on its shadow, in order."""
    model: Any = lane.live_model
    while lane.effects:
        effects = lane.effects.popleft()
        if model is None:
            continue
        if effects.get("stop_training"):
            model.stop_training = True
        if "learning_rate" in effects:
            model.optimizer.learning_rate = effects["learning_rate"]
