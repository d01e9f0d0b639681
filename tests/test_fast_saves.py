"""Guarantee 13: a save after a run's first one is the snapshot copied into
the file layout Keras' writer used; the files are Keras' own, byte for byte
(`.keras`: but for its zip timestamps and `date_saved`), and what cannot be
proved so goes through Keras, with the reason counted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from artifacts import assert_same_checkpoints, checkpoint_tensors
from conftest import make_model, mnist_like
# A layer whose `save_own_variables` is its own code (without its signals,
# it saves as Keras' does), and a small model around a layer.
from gated import GatedSave
from test_process import _model

from asynccb import AsyncCallback

FAST = "fast"
FIRST = "keras: first save of its layout (learning the file)"
FIT = dict(batch_size=32, shuffle=False, verbose=0)


def keras_entries(path: Path) -> list[tuple]:
    """A `.keras` file's entries, with what differs between any two saves of
    one state left out: `date_saved`, the zip's timestamps, and the marks
    Keras' config puts on objects that layers share (their memory
    addresses; a model Keras loads, or asynccb rebuilds, shares none, and
    Keras' own files of it have none)."""
    entries = []
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            content = archive.read(info)
            if info.filename == "metadata.json":
                metadata = json.loads(content)
                metadata["date_saved"] = "#"
                content = json.dumps(metadata).encode()
            elif info.filename == "config.json":
                content = re.sub(rb', "shared_object_id": \d+', b"", content)
            entries.append((info.filename, info.compress_type,
                            info.flag_bits, info.external_attr, content))
    return entries


def assert_keras_files(expected: Path, actual: Path) -> list[str]:
    """Every checkpoint in `actual` is the one in `expected`: byte for byte,
    but for what differs between any two saves of a `.keras` file."""
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in actual.iterdir()) == names
    for name in names:
        if name.endswith(".keras"):
            assert keras_entries(actual / name) == keras_entries(
                expected / name), name
        else:
            assert (actual / name).read_bytes() == (
                expected / name).read_bytes(), name
    return names


def checkpoints(directory: Path, every: int) -> list:
    """A `.keras` and a `.weights.h5` ModelCheckpoint, every `every` steps."""
    return [
        keras.callbacks.ModelCheckpoint(
            str(directory / "{epoch:02d}-{batch:03d}.keras"),
            save_freq=every),
        keras.callbacks.ModelCheckpoint(
            str(directory / "{epoch:02d}-{batch:03d}.weights.h5"),
            save_weights_only=True, save_freq=every),
    ]


def test_saves_after_the_first_are_keras_files_byte_for_byte(
        tmp_path, executor):
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    wrapped = [AsyncCallback(c, executor=executor)
               for c in checkpoints(ours, every=3)]
    model = make_model("functional")
    x, y = mnist_like(256)
    # Plain Keras' checkpoints run first at each step, on the same state.
    model.fit(x, y, epochs=2, **FIT,
              callbacks=checkpoints(keras_dir, every=3) + wrapped)
    names = assert_keras_files(keras_dir, ours)
    assert len(names) == 2 * 5  # 16 steps, every 3.
    for callback in wrapped:
        assert callback.stats().save_paths == {FIRST: 1, FAST: 4}
    if executor == "process":
        assert_loads_in_a_fresh_interpreter(keras_dir, ours)


def test_the_next_run_of_a_model_saves_fast_from_its_first_save(
        tmp_path, executor):
    """What a run learned of a model's files serves the model's next run
    (a notebook's next `fit`): its saves are all fast, and Keras' files."""
    model = make_model("functional")
    x, y = mnist_like(128)
    paths = []
    for run in range(2):
        keras_dir, ours = tmp_path / f"keras{run}", tmp_path / f"asynccb{run}"
        keras_dir.mkdir(), ours.mkdir()
        wrapped = [AsyncCallback(c, executor=executor)
                   for c in checkpoints(ours, every=2)]
        model.fit(x, y, epochs=1, **FIT,
                  callbacks=checkpoints(keras_dir, every=2) + wrapped)
        assert len(assert_keras_files(keras_dir, ours)) == 2 * 2
        paths.append([dict(c.stats().save_paths) for c in wrapped])
    assert paths == [[{FIRST: 1, FAST: 1}] * 2, [{FAST: 2}] * 2]


def test_a_worker_reports_where_files_put_the_state_for_the_next_snapshots(
        tmp_path, monkeypatch):
    """A worker process that learned a file tells the training process
    where it puts each large variable within a page; the next snapshots
    are laid out so (and written from shared memory), and every file is
    still Keras'. Each layout travels to the worker once."""
    import cloudpickle

    from asynccb._executors.process import messages, pool
    from asynccb._file_template import learn_keras_file, learn_weights_file
    from asynccb._save_sources import dataset_slots
    from asynccb._snapshot import StateLayout, StateLevel, state_variables

    sent = []  # Each save task's snapshot layout, as sent.
    send = pool.WorkerProcess.send

    def recorded(self, message):
        if isinstance(message, messages.RunTask):
            task = cloudpickle.loads(message.task)
            if task.kind == "save":
                sent.append((message.lane, task.snapshot.layout))
        send(self, message)

    monkeypatch.setattr(pool.WorkerProcess, "send", recorded)
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    wrapped = [AsyncCallback(c, executor="process")
               for c in checkpoints(ours, every=2)]
    model = make_model("functional", units=128)  # A 392 KiB kernel.
    x, y = mnist_like(256)
    for run in range(2):  # The report may come after the first run's saves.
        model.fit(x, y, epochs=1, **FIT,
                  callbacks=checkpoints(keras_dir, every=2) + wrapped)
        assert len(assert_keras_files(keras_dir, ours)) == 2 * 4
        if run == 0:
            for callback in wrapped:
                assert callback.stats().save_paths == {FIRST: 1, FAST: 3}
    # Per lane, two layouts, each sent once: the first, then (by the next
    # run's first save) the one laid out for its file.
    lanes = {lane for lane, _ in sent}
    assert len(lanes) == 2
    for lane in lanes:
        layouts = [layout for number, layout in sent if number == lane]
        assert len(layouts) == 2 * 4
        new = [at for at, layout in enumerate(layouts) if layout is not None]
        assert new[0] == 0 and len(new) == 2 and new[1] <= 4, layouts
        assert not layouts[0].phases and layouts[new[1]].phases
        # The same buffer serves both: no second one for the new layout.
        assert layouts[0].nbytes == layouts[new[1]].nbytes
    # Where the worker's last files put the variables (a `.keras` file of
    # the shadow has no `shared_object_id` marks: not where Keras' has).
    variables = state_variables(model, StateLevel.FULL)
    arrays = [np.asarray(v) for v in variables]
    slots = dataset_slots(model, variables)
    last = sorted(ours.iterdir())
    learned = [learn_keras_file(str(last[-2]), slots, arrays, ()).phases(),
               learn_weights_file(str(last[-1]), slots, arrays).phases()]
    for callback, phases in zip(wrapped, learned):  # Each its own file's.
        layout = callback._dispatcher.snapshotter.layout(
            model, StateLevel.FULL)
        assert dict(layout.spec.phases) == phases
        assert len(layout.spec.phases) >= 3  # Kernel and its two moments.
        for slot, phase in layout.spec.phases:
            assert layout.spec.slots[slot].offset % 4096 == phase
    assert StateLayout(StateLevel.FULL, variables).spec.phases == ()


def test_a_threads_saves_write_snapshots_laid_out_for_the_file(
        tmp_path, monkeypatch):
    """On a thread, snapshots hold tensors until a save learned where the
    file puts the state; from then on they are copies laid out so, whose
    large variables' pages the saves write straight from the snapshot
    (no staging copy, no held tensor for training to copy), and every
    file is still Keras'."""
    from asynccb import _staged_file
    from asynccb._snapshot import StateLevel, allocate_private, kept_private

    if not _takes_direct_io(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open")
    direct = []  # Where in a page each block written from memory starts.
    add_direct = _staged_file.StagedFile._add_direct

    def recorded(self, block, before):
        direct.append(_staged_file.address(block) % _staged_file.ALIGN)
        add_direct(self, block, before)

    monkeypatch.setattr(_staged_file.StagedFile, "_add_direct", recorded)
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    wrapped = [AsyncCallback(c, executor="thread")
               for c in checkpoints(ours, every=2)]
    model = make_model("functional", units=128)  # A 392 KiB kernel.
    x, y = mnist_like(256)
    copied, kept = [], []
    kept_private.free()  # Earlier tests'.
    for run in range(3):  # The report may come after the first run's saves.
        direct.clear()
        model.fit(x, y, epochs=1, **FIT,
                  callbacks=checkpoints(keras_dir, every=2) + wrapped)
        assert len(assert_keras_files(keras_dir, ours)) == 2 * 4
        copied.append([c._dispatcher.snapshotter.snapshot_bytes
                       for c in wrapped])
        kept.append(sorted(_staged_file.address(memory)
                           for memory in kept_private.pieces()))
    # The copies' memory is kept between runs, and reused, not made anew.
    assert kept[1] and kept[2] == kept[1], kept
    for callback in wrapped:
        snapshotter = callback._dispatcher.snapshotter
        assert snapshotter.allocate_in_process() is allocate_private
        assert snapshotter.layout(model, StateLevel.FULL).spec.phases
        assert callback.stats().save_paths == {FIRST: 1, FAST: 11}
    # The third run's snapshots were copies (held ones copy nothing).
    assert all(b - a > 0 for a, b in zip(copied[1], copied[2])), copied
    # Two files per save, three large variables each (kernel, moments).
    assert len(direct) >= 2 * 4 * 3 and set(direct) == {0}, direct
    # New callbacks for the same model: every save is fast from the first,
    # and every snapshot a copy laid out for the file, the first too (the
    # model's phases are kept with it).
    fresh = [AsyncCallback(c, executor="thread")
             for c in checkpoints(ours, every=2)]
    model.fit(x, y, epochs=1, **FIT, callbacks=fresh)
    for callback in fresh:
        snapshotter = callback._dispatcher.snapshotter
        assert callback.stats().save_paths == {FAST: 4}
        assert snapshotter.allocate_in_process() is allocate_private
        full = snapshotter.layout(model, StateLevel.FULL)
        assert full.spec.phases
        assert snapshotter.snapshot_bytes == 4 * full.nbytes


def test_on_a_thread_only_snapshots_laid_out_for_a_file_are_copies(
        tmp_path):
    """In a list whose checkpoint's snapshots became copies laid out for
    its file (the full state), a callback reading the weights at each
    epoch's end still gets held tensors: only the saves' snapshots cost
    the hook a copy, and the weights read are those of their step."""
    from asynccb import AsyncCallbackList
    from asynccb._snapshot import StateLevel

    if not _takes_direct_io(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open")

    class ReadsKernel(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.kernels = []

        def on_epoch_end(self, epoch, logs=None):
            self.kernels.append(self.model.get_weights()[0])

    class Truth(keras.callbacks.Callback):  # Synchronous: the live model.
        def __init__(self):
            super().__init__()
            self.kernels = []

        def on_epoch_end(self, epoch, logs=None):
            self.kernels.append(self.model.get_weights()[0])

    model = make_model("functional", units=128)
    x, y = mnist_like(256)  # 8 steps of 32: a save every 4.
    reads, truth = ReadsKernel(), Truth()
    callbacks = AsyncCallbackList([
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "{epoch:02d}-{batch:03d}.keras"), save_freq=4),
        AsyncCallback(reads, executor="thread", state="weights"),
        truth,
    ], model=model, add_history=True, executor="thread")
    model.fit(x, y, epochs=1, **FIT, callbacks=callbacks)  # Learns the file.
    snapshotter = callbacks._dispatcher.snapshotter
    before = snapshotter.snapshots, snapshotter.snapshot_bytes
    model.fit(x, y, epochs=2, **FIT, callbacks=callbacks)
    full = snapshotter.layout(model, StateLevel.FULL)
    assert full.spec.phases  # Laid out for the file.
    # Two saves per epoch, each a copy; two epoch ends, each held.
    assert snapshotter.snapshots - before[0] == 2 * 2 + 2
    assert snapshotter.snapshot_bytes - before[1] == 2 * 2 * full.nbytes
    assert len(reads.kernels) == len(truth.kernels) == 3
    for read, live in zip(reads.kernels, truth.kernels):
        np.testing.assert_array_equal(read, live)


def test_a_run_whose_saves_are_all_fast_builds_no_shadow(
        tmp_path, monkeypatch):
    """A checkpoint's shadow model is built only for a save through
    Keras' writer: a model's next run, whose files fast saves know, builds
    none (at 300 MiB of state a build cost a worker a second of CPU)."""
    from asynccb._shadow import ModelBlueprint

    builds = []
    build = ModelBlueprint.build

    def counted_build(self):
        builds.append(self.key)
        return build(self)

    monkeypatch.setattr(ModelBlueprint, "build", counted_build)
    model = make_model("functional")
    x, y = mnist_like(128)
    for run in range(2):
        wrapped = [AsyncCallback(c, executor="thread") for c in
                   checkpoints(tmp_path / str(run), every=2)]
        model.fit(x, y, epochs=1, **FIT, callbacks=wrapped)
        assert len(list((tmp_path / str(run)).iterdir())) == 2 * 2
        if run == 0:  # One shadow, shared by the two checkpoints.
            assert len(builds) == 1
    assert len(builds) == 1


LOADER = """
import sys, numpy as np, keras
sys.path.insert(0, {tests!r})
from conftest import make_model, Scale
for path in sys.argv[1:]:
    if path.endswith(".keras"):
        model = keras.saving.load_model(path, custom_objects={{"Scale": Scale}})
    else:
        model = make_model("functional", seed=7)
        model.optimizer.build(model.trainable_variables)
        model.load_weights(path)
    state = [np.asarray(v) for v in model.weights + model.optimizer.variables]
    np.savez(path + ".npz", *state)
"""


def assert_loads_in_a_fresh_interpreter(expected: Path, actual: Path):
    """Loads every file of `actual` with Keras in a new interpreter; each
    tensor equals, bit for bit, the one Keras wrote in `expected`."""
    files = sorted(str(p) for p in actual.iterdir())
    loaded = subprocess.run(
        [sys.executable, "-c",
         LOADER.format(tests=str(Path(__file__).parent)), *files],
        capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    for path in files:
        name = Path(path).name
        want = list(checkpoint_tensors(expected / name).values())
        with np.load(path + ".npz") as state:
            got = [state[f"arr_{i}"] for i in range(len(state.files))]
        # The same tensors (the file's are by dataset name, the loaded
        # model's in variable order): compare as sorted byte strings.
        assert sorted(a.tobytes() for a in got) == sorted(
            a.tobytes() for a in want), name


class ChangesLearningRate(keras.callbacks.Callback):
    """Halves the learning rate at the start of epoch 1 only."""

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.model.optimizer.learning_rate = (
                float(self.model.optimizer.learning_rate) / 2)


def test_a_changed_learning_rate_is_in_the_config_written(tmp_path):
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    checkpoint = AsyncCallback(
        keras.callbacks.ModelCheckpoint(str(ours / "{epoch:02d}.keras")),
        executor="thread")
    model = make_model("sequential")
    x, y = mnist_like(128)
    model.fit(x, y, epochs=3, **FIT, callbacks=[
        ChangesLearningRate(),
        keras.callbacks.ModelCheckpoint(str(keras_dir / "{epoch:02d}.keras")),
        checkpoint])
    assert_keras_files(keras_dir, ours)
    with zipfile.ZipFile(ours / "02.keras") as archive:
        config = json.loads(archive.read("config.json"))
    assert config["compile_config"]["optimizer"]["config"][
        "learning_rate"] == pytest.approx(5e-4)
    assert checkpoint.stats().save_paths == {
        FIRST: 1,
        "keras: the config changed (an optimizer hyperparameter such as the "
        "learning rate); learning the file again": 1,
        FAST: 1}


def _lora_dense():
    layer = keras.layers.Dense(8, name="lora")
    layer.build((None, 784))
    layer.enable_lora(2)
    return layer


@pytest.mark.parametrize("case,make_model_,fast_saves,reason", [
    ("own save code", lambda: _model(GatedSave()), True,
     "keras: GatedSave.save_own_variables is not Keras' own"),
    ("LoRA kernel", lambda: _model(_lora_dense()), True,
     "keras: layers/dense/vars/0 (of 'lora') holds a value computed while "
     "saving, not a copy of a variable"),
    ("switched off", lambda: make_model("sequential"), False,
     "keras: fast saves switched off (fast_saves=False)"),
])
def test_what_cannot_be_copied_is_saved_by_keras(
        tmp_path, case, make_model_, fast_saves, reason):
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    # The switch travels to a worker process with each save.
    checkpoint = AsyncCallback(
        keras.callbacks.ModelCheckpoint(str(ours / "{epoch:02d}.keras")),
        executor="process" if case == "switched off" else "thread",
        fast_saves=fast_saves)
    x, y = mnist_like(64)
    _with = make_model_()
    _with.fit(x, y, epochs=3, **FIT, callbacks=[
        keras.callbacks.ModelCheckpoint(str(keras_dir / "{epoch:02d}.keras")),
        checkpoint])
    assert_same_checkpoints(keras_dir, ours)
    assert checkpoint.stats().save_paths == {reason: 3}


def test_other_formats_are_saved_by_keras(tmp_path):
    checkpoint = AsyncCallback(
        keras.callbacks.ModelCheckpoint(str(tmp_path / "{epoch:02d}.h5")),
        executor="thread")
    x, y = mnist_like(64)
    make_model("sequential").fit(x, y, epochs=2, **FIT,
                                 callbacks=[checkpoint])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["01.h5", "02.h5"]
    assert checkpoint.stats().save_paths == {
        "keras: a format other than .keras and .weights.h5": 2}


class SavesItsModel(keras.callbacks.Callback):
    """Saves `self.model` in both formats at each epoch's end, after
    zeroing its output bias if `zero_bias`."""

    def __init__(self, directory, zero_bias=False):
        super().__init__()
        self.directory, self.zero_bias = directory, zero_bias

    def on_epoch_end(self, epoch, logs=None):
        if self.zero_bias:
            bias = self.model.layers[-1].bias
            bias.assign(np.zeros(bias.shape, "float32"))
        self.model.save(self.directory / f"{epoch:02d}.keras")
        self.model.save_weights(self.directory / f"{epoch:02d}.weights.h5")


@pytest.mark.parametrize("executor_", ["thread", "process"])
def test_a_callbacks_own_saves_of_its_model_are_fast(tmp_path, executor_):
    keras_dir, ours = tmp_path / "keras", tmp_path / "asynccb"
    keras_dir.mkdir(), ours.mkdir()
    wrapper = AsyncCallback(SavesItsModel(ours), executor=executor_)
    x, y = mnist_like(64)
    make_model("functional").fit(x, y, epochs=3, **FIT, callbacks=[
        SavesItsModel(keras_dir), wrapper])
    assert len(assert_keras_files(keras_dir, ours)) == 6
    assert wrapper.stats().save_paths == {FIRST: 2, FAST: 4}


def test_a_callbacks_own_save_writes_what_its_model_holds(tmp_path):
    wrapper = AsyncCallback(SavesItsModel(tmp_path, zero_bias=True),
                            executor="thread")
    x, y = mnist_like(64)
    model = make_model("functional")
    model.fit(x, y, epochs=3, **FIT, callbacks=[wrapper])
    assert wrapper.stats().save_paths == {FIRST: 2, FAST: 4}
    assert np.any(model.layers[-1].bias.numpy())  # The live one is not.
    for name in sorted(p.name for p in tmp_path.iterdir()):
        tensors = checkpoint_tensors(tmp_path / name)
        assert not np.any(tensors["layers/dense_1/vars/1"]), name


def _learning_inputs(tmp_path):
    from asynccb._save_sources import dataset_slots
    from asynccb._snapshot import (
        StateLayout,
        StateLevel,
        allocate_private,
        state_variables,
    )

    model = make_model("functional")
    x, y = mnist_like(64)
    model.fit(x, y, epochs=1, **FIT)
    variables = state_variables(model, StateLevel.FULL)
    layout = StateLayout(StateLevel.FULL, variables)
    buffer = allocate_private(layout.nbytes)
    layout.capture(buffer)
    path = tmp_path / "model.weights.h5"
    model.save_weights(path)
    return (str(path), dataset_slots(model, variables),
            buffer.views(layout.spec), model)


@pytest.mark.parametrize("executor_", ["thread", "async"])
def test_a_fast_save_lets_go_of_its_snapshot_before_the_sync(
        tmp_path, monkeypatch, executor_):
    """Held tensors that training updates while a snapshot holds them,
    TensorFlow copies: a fast save lets go of its snapshot once its bytes
    are written, not after the sync, which may take many steps."""
    import threading

    from asynccb import _saving
    from asynccb._snapshot import Snapshot

    events = []  # (what, snapshot serial, thread), in order.
    release, fsync_path = Snapshot.release, _saving._fsync_path

    def recorded_release(self):
        events.append(("release", self.serial, threading.get_ident()))
        release(self)

    def recorded_fsync(path, directory=False):
        if not directory:
            events.append(("sync", None, threading.get_ident()))
        fsync_path(path, directory)

    monkeypatch.setattr(Snapshot, "release", recorded_release)
    monkeypatch.setattr(_saving, "_fsync_path", recorded_fsync)
    wrapped = AsyncCallback(keras.callbacks.ModelCheckpoint(
        str(tmp_path / "{batch:02d}.weights.h5"), save_weights_only=True,
        save_freq=1), executor=executor_)
    x, y = mnist_like(128)
    make_model("functional").fit(x, y, epochs=1, **FIT, callbacks=[wrapped])
    assert wrapped.stats().save_paths == {FIRST: 1, FAST: 3}
    syncs = [at for at, (what, _, _) in enumerate(events) if what == "sync"]
    serials = sorted({serial for what, serial, _ in events
                      if what == "release"})
    assert len(syncs) == len(serials) == 4  # A snapshot per save.
    training = threading.get_ident()
    for synced_at, serial in list(zip(syncs, serials))[1:]:  # Fast saves.
        # Off the training thread (which lets go of it too, once it has
        # handed it out), the save let go of its snapshot before the sync.
        saver_released = [at for at, (what, of, thread) in enumerate(events)
                          if of == serial and thread != training]
        assert saver_released and saver_released[0] < synced_at, events


@pytest.mark.parametrize("direct", [True, False],
                         ids=["direct I/O", "page cache"])
@pytest.mark.parametrize("stage, chunk", [
    (8192, 1024),  # Many stages; the weights' checksum set late.
    (8192, 8192),  # Chunks as big as a stage.
    (2**30, 2**18),  # One stage: the checksum set before writing.
])
def test_a_file_written_in_stages_is_the_file_keras_wrote(
        tmp_path, monkeypatch, stage, chunk, direct):
    """However the pieces of a save fall into staged writes, direct or
    through the page cache, the file is Keras' (its weights entry's
    checksum included: `zipfile` checks it), and the checksum set in a
    header already written reads nothing back from the disk."""
    from asynccb import _file_template, _staged_file
    from asynccb._file_template import learn_keras_file, learn_weights_file

    monkeypatch.setattr(_staged_file, "STAGE_BYTES", stage)
    monkeypatch.setattr(_file_template, "_CHUNK", chunk)
    monkeypatch.setattr(_file_template, "_DIRECT_IO", direct)
    path, slots, arrays, model = _learning_inputs(tmp_path)
    template = learn_weights_file(path, slots, arrays)
    rewritten = tmp_path / "rewritten.weights.h5"
    template.write(str(rewritten), arrays)
    assert rewritten.read_bytes() == Path(path).read_bytes()

    keras_file = tmp_path / "model.keras"
    model.save(keras_file)
    template = learn_keras_file(str(keras_file), slots, arrays, ())
    rewritten = tmp_path / "rewritten.keras"
    reads = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv",
                        lambda *args: reads.append(args) or preadv(*args))
    template.write(str(rewritten), arrays)
    assert not reads
    assert keras_entries(rewritten) == keras_entries(keras_file)
    # Another state: `zipfile` checks the central directory's checksums
    # against the data; each entry's local header must have them too.
    template.write(str(rewritten), [a + np.ones((), a.dtype) for a in arrays])
    with zipfile.ZipFile(rewritten) as archive, open(rewritten, "rb") as f:
        assert archive.testzip() is None
        for info in archive.infolist():
            f.seek(info.header_offset + 14)
            assert int.from_bytes(f.read(4), "little") == info.CRC


@pytest.mark.parametrize("form", [".weights.h5", ".keras"])
def test_a_snapshot_laid_out_for_the_file_is_written_from_its_memory(
        tmp_path, monkeypatch, form):
    """A snapshot whose large slots lie where the file puts them within a
    page (`Template.phases`) has their whole pages written straight from
    its buffer, with direct I/O, the whole file in one write (a `.keras`
    file's checksum set in its header before it), and the file is still
    Keras'."""
    import mmap

    from asynccb import _file_template, _staged_file
    from asynccb._file_template import learn_keras_file, learn_weights_file
    from asynccb._snapshot import (
        Buffer,
        StateLayout,
        StateLevel,
        state_variables,
    )

    if not _takes_direct_io(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open")
    monkeypatch.setattr(_staged_file, "DIRECT_FROM", 8192)
    monkeypatch.setattr(_file_template, "DIRECT_FROM", 8192)
    path, slots, arrays, model = _learning_inputs(tmp_path)
    if form == ".keras":
        path = str(tmp_path / "model.keras")
        model.save(path)
        template = learn_keras_file(path, slots, arrays, ())
    else:
        template = learn_weights_file(path, slots, arrays)
    phases = template.phases()
    assert len(phases) >= 3, phases  # Two kernels' and their moments.
    variables = state_variables(model, StateLevel.FULL)
    layout = StateLayout(StateLevel.FULL, variables, phases)
    memory = mmap.mmap(-1, layout.nbytes)  # Page-aligned, as shared memory.
    buffer = Buffer(np.frombuffer(memory, np.uint8))
    layout.capture(buffer)
    direct = []
    add_direct = _staged_file.StagedFile._add_direct

    def recorded(self, block, before):
        direct.append(_staged_file.address(block) % _staged_file.ALIGN)
        add_direct(self, block, before)

    writes = []
    pwritev_all = _staged_file._pwritev_all

    def counted(fd, pieces, offset):
        writes.append((len(pieces), offset))
        pwritev_all(fd, pieces, offset)

    monkeypatch.setattr(_staged_file.StagedFile, "_add_direct", recorded)
    monkeypatch.setattr(_staged_file, "_pwritev_all", counted)
    rewritten = tmp_path / ("rewritten" + form)
    template.write(str(rewritten), buffer.views(layout.spec))
    assert len(direct) == len(phases) and set(direct) == {0}
    assert len(writes) == 1 and writes[0][1] == 0, writes
    if form == ".keras":
        assert keras_entries(rewritten) == keras_entries(path)
        with zipfile.ZipFile(rewritten) as archive:
            assert archive.testzip() is None  # The checksum, over all.
    else:
        assert rewritten.read_bytes() == Path(path).read_bytes()
    buffer.free()  # Its views first: a mapping closes with none left.
    memory.close()


def test_saves_take_direct_io_where_the_file_system_does(tmp_path):
    """A file system that takes `O_DIRECT` gets the staged writes
    direct; one that refuses it at `open` gets them through the page
    cache."""
    from asynccb._staged_file import StagedFile

    out = StagedFile(str(tmp_path / "file"))
    try:
        out.add(memoryview(b"x" * 5000))
        out.flush()
        assert out.direct is _takes_direct_io(tmp_path)
    finally:
        out.close()
    assert (tmp_path / "file").read_bytes() == b"x" * 5000


def test_direct_io_refused_at_the_first_write(tmp_path, monkeypatch):
    """A file system that takes `O_DIRECT` at `open` but refuses the first
    write (here: the kernel refusing a write not aligned to the disk's
    blocks) gets the file through the page cache, whole, each slot let go
    of once."""
    from asynccb import _staged_file
    from asynccb._file_template import learn_weights_file

    if not _takes_direct_io(tmp_path):
        pytest.skip("this file system refuses O_DIRECT at open")
    monkeypatch.setattr(_staged_file, "ALIGN", 1)  # Unaligned writes.
    path, slots, arrays, _ = _learning_inputs(tmp_path)
    template = learn_weights_file(path, slots, arrays)
    refused = []
    original_flush = _staged_file.StagedFile.flush

    def recorded_flush(self):
        try:
            original_flush(self)
        except _staged_file.DirectIORefused:
            refused.append(self.direct)
            raise

    monkeypatch.setattr(_staged_file.StagedFile, "flush", recorded_flush)
    let_go = []
    rewritten = tmp_path / "rewritten.weights.h5"
    template.write(str(rewritten), arrays, let_go.append)
    assert refused == [True]
    assert rewritten.read_bytes() == Path(path).read_bytes()
    assert sorted(let_go) == sorted({r.slot for r in template.regions})


def _takes_direct_io(directory) -> bool:
    try:
        os.close(os.open(directory / "probe", os.O_WRONLY | os.O_CREAT
                         | os.O_DIRECT))
    except OSError:
        return False
    return True


def test_each_slot_is_let_go_of_once_its_bytes_are_in_the_file(
        tmp_path, monkeypatch):
    """A save reports each variable once the file has its bytes, holding
    no reference to it after: the caller lets go of it while the rest is
    written (training then need not copy it on its next update)."""
    import weakref

    from asynccb import _file_template, _staged_file
    from asynccb._file_template import learn_weights_file

    monkeypatch.setattr(_staged_file, "STAGE_BYTES", 8192)
    monkeypatch.setattr(_file_template, "_CHUNK", 4096)
    path, slots, views, _ = _learning_inputs(tmp_path)
    template = learn_weights_file(path, slots, views)
    arrays = [np.array(view) for view in views]  # The caller's, alone.
    alive = [weakref.ref(array) for array in arrays]
    rewritten = tmp_path / "rewritten.weights.h5"
    seen = {}  # Slot: (the file's bytes then, whether it was still alive).

    def written(slot):
        arrays[slot] = None
        seen[slot] = (rewritten.read_bytes(), alive[slot]() is not None)

    template.write(str(rewritten), arrays, written)
    final = rewritten.read_bytes()
    assert final == Path(path).read_bytes()
    assert sorted(seen) == sorted({r.slot for r in template.regions})
    for region in template.regions:
        then, still_alive = seen[region.slot]
        end = region.offset + region.nbytes
        assert then[region.offset:end] == final[region.offset:end]
        assert not still_alive, region
    # Reported as the file grew, not all at its end.
    assert min(len(then) for then, _ in seen.values()) < len(final) / 2


def test_learning_proves_the_file_holds_the_snapshot(tmp_path):
    """Learning refuses a file it could not rewrite exactly: a dataset
    stored otherwise than Keras stores it (compressed), or bytes that are
    not the snapshot's (a writer that transforms values)."""
    import h5py

    from asynccb._errors import CannotCopySave
    from asynccb._file_template import learn_weights_file

    path, slots, arrays, _ = _learning_inputs(tmp_path)
    template = learn_weights_file(path, slots, arrays)  # As Keras wrote it.
    rewritten = tmp_path / "rewritten.weights.h5"
    template.write(str(rewritten), arrays)
    assert rewritten.read_bytes() == Path(path).read_bytes()

    name = "layers/dense/vars/0"
    with h5py.File(path, "r+") as h5file:
        data = h5file[name][()]
        h5file[name][...] = data + 1  # Not the snapshot's values.
    with pytest.raises(CannotCopySave, match="are not the snapshot's"):
        learn_weights_file(path, slots, arrays)
    with h5py.File(path, "r+") as h5file:
        del h5file[name]
        h5file.create_dataset(name, data=data, compression="gzip")
    with pytest.raises(CannotCopySave, match="chunked or filtered"):
        learn_weights_file(path, slots, arrays)


def test_templates_are_kept_for_the_last_models_only():
    """What fast saves learned is kept for the models saved last (each a
    blueprint), not for every model a long session ever trained."""
    from types import SimpleNamespace

    from asynccb import _fast_saves

    shadows = [SimpleNamespace(blueprint=SimpleNamespace(key=f"model {i}"))
               for i in range(_fast_saves._MODELS_KEPT + 3)]
    first = _fast_saves._templates(shadows[0])
    first["learned"] = "a template"
    for shadow in shadows[1:-1]:
        _fast_saves._templates(shadow)
        # The first model saves again: the most recently used.
        assert _fast_saves._templates(shadows[0]) is first
    _fast_saves._templates(shadows[-1])
    kept = set(_fast_saves._learned)
    assert len(kept) == _fast_saves._MODELS_KEPT
    assert "model 0" in kept and "model 1" not in kept
    assert _fast_saves._templates(shadows[0]) == {"learned": "a template"}
