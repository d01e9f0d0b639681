"""Which worker of a cluster this training process is: one copy per cluster.

Under a multi-worker strategy every worker runs the same `fit` (or loop)
and calls the same hooks; plain Keras 3 has every worker write every file.
asynccb runs offloaded callbacks on the chief only, as TensorFlow's own
`strategy.extended.should_checkpoint` says; the others take no snapshot,
start no worker and write nothing. Control callbacks are not offloaded,
so they run inline everywhere, keeping the workers in step.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["is_chief"]


def is_chief(model: Any) -> bool:
    """Whether this process does the cluster's offloaded work.

    From the model's distribution strategy (or the one in scope): under a
    multi-worker strategy, its chief (`should_checkpoint`); otherwise,
    from `TF_CONFIG` if set (the chief, or worker 0 of a cluster without
    one); a single process is its own chief, and so is an evaluator (a
    side-car evaluation job: no other process does its work).
    """
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    extended = strategy.extended
    multi_worker = getattr(extended, "_in_multi_worker_mode", None)
    if callable(multi_worker) and multi_worker():
        return bool(extended.should_checkpoint)
    return _chief_by_tf_config(os.environ.get("TF_CONFIG", ""))


def _chief_by_tf_config(tf_config: str) -> bool:
    config = json.loads(tf_config) if tf_config.strip() else {}
    cluster, task = config.get("cluster") or {}, config.get("task") or {}
    kind = task.get("type")
    if not cluster or not kind:
        return True
    if kind in ("chief", "evaluator"):
        return True
    return kind == "worker" and "chief" not in cluster and (
        int(task.get("index", 0)) == 0)
