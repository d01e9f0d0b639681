"""Which worker does a cluster's offloaded work, by `TF_CONFIG` (the
fallback when no multi-worker strategy says), without TensorFlow."""

from __future__ import annotations

import json

import pytest

from asynccb._cluster import _chief_by_tf_config


def _config(task_type, index, chief=False):
    cluster = {"worker": ["a:1", "b:2"]}
    if chief:
        cluster["chief"] = ["c:3"]
    return json.dumps({"cluster": cluster,
                       "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize("tf_config, chief", [
    ("", True),  # One process: its own chief.
    ("{}", True),
    (_config("worker", 0), True),  # No chief task: worker 0 is it.
    (_config("worker", 1), False),
    (_config("worker", 0, chief=True), False),
    (_config("chief", 0, chief=True), True),
    (_config("evaluator", 0), True),  # A side-car job: its own work.
    (_config("ps", 0), False),
])
def test_the_chief_by_tf_config(tf_config, chief):
    assert _chief_by_tf_config(tf_config) is chief
