"""Readers for what callbacks write: checkpoint tensors, TensorBoard scalars."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor stored in a `.keras` or `.weights.h5` file, by path."""
    path = str(path)
    if path.endswith(".keras"):
        with zipfile.ZipFile(path) as archive:
            handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    else:
        handle = h5py.File(path, "r")
    tensors: dict[str, np.ndarray] = {}
    with handle:
        handle.visititems(
            lambda name, obj: tensors.__setitem__(name, obj[()])
            if isinstance(obj, h5py.Dataset) else None
        )
    return tensors


def assert_same_checkpoints(expected_dir: Path, actual_dir: Path) -> list[str]:
    """Asserts both directories hold the same checkpoint files, with every
    tensor equal bit for bit. Returns the names compared."""
    expected = sorted(p.name for p in expected_dir.iterdir())
    actual = sorted(p.name for p in actual_dir.iterdir())
    assert actual == expected
    compared = []
    for name in expected:
        if not name.endswith((".keras", ".h5")):
            continue
        want = checkpoint_tensors(expected_dir / name)
        got = checkpoint_tensors(actual_dir / name)
        assert sorted(got) == sorted(want), name
        for key in want:
            assert got[key].dtype == want[key].dtype, (name, key)
            assert got[key].tobytes() == want[key].tobytes(), (name, key)
        compared.append(name)
    return compared


def tensorboard_scalars(log_dir: str | os.PathLike) -> dict[str, dict]:
    """Per run subdirectory, `{(tag, step): value}` of its scalar summaries."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    runs: dict[str, dict] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        run = event_file.parent.name
        scalars = runs.setdefault(run, {})
        for record in tf.data.TFRecordDataset(str(event_file)):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    scalar = tf.make_ndarray(value.tensor).item()
                    scalars[(value.tag, event.step)] = scalar
    return runs


def tensorboard_events(log_dir: str | os.PathLike) -> dict[str, list[tuple]]:
    """Per run subdirectory, every event that holds data, as sorted
    `(tag, step, plugin, value)` tuples, whichever of the run's event files
    holds it (TensorBoard reads them all): scalars as floats, other
    summaries as their tensor's bytes, a graph as `("<graph>", step, "",
    its bytes)`. Wall times and file names, which differ between any two
    runs, are left out."""
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    runs: dict[str, list[tuple]] = {}
    for event_file in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        events = runs.setdefault(
            str(event_file.parent.relative_to(log_dir)), [])
        for record in tf.data.TFRecordDataset(str(event_file)):
            event = event_pb2.Event.FromString(record.numpy())
            if event.graph_def:
                events.append(("<graph>", event.step, "", event.graph_def))
            for value in event.summary.value:
                plugin = value.metadata.plugin_data.plugin_name
                tensor = tf.make_ndarray(value.tensor)
                if plugin == "scalars":
                    data = tensor.item()
                elif tensor.dtype == object:  # Strings: the model's JSON.
                    data = repr(tensor.tolist())
                else:
                    data = tensor.tobytes()
                events.append((value.tag, event.step, plugin, data))
    return {run: sorted(events) for run, events in runs.items()}
