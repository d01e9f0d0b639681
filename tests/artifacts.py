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
