"""The benchmark harness runs every variant and reports in the documented
shape (its timings are not tested: they are the benchmark's business)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
PER_RUN = {"probe_s", "cpu_trainer_s", "cpu_workers_s",
           "checkpoints_in_window", "slow", "slow_reason"}
PER_VARIANT = {"name", "steps_per_s", "ratio_to_baseline", "paired_ratio",
               "paired_ratio_min", "paired_ratio_max", "repeats_used",
               "slow_runs", "cpu_trainer_s", "cpu_workers_s",
               "cpu_per_checkpoint_s", "cpu_per_checkpoint_over_raw_write",
               "stall_p50_s", "stall_p99_s", "memcpy_floor_s",
               "peak_rss_bytes", "verified"}


def run_benchmark(arguments: list[str]) -> dict:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import heavy_checkpointing

        return heavy_checkpointing.main(arguments)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_tiny_alone(tmp_path: Path, *arguments: str
                   ) -> tuple[subprocess.CompletedProcess, dict]:
    """A tiny heavy run in its own process (for options that set up the
    whole process: pinning, worker CPUs); its output and its JSON."""
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "heavy_checkpointing.py"),
         "--tiny", *arguments, "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed, saved_document(tmp_path)


def saved_document(directory: Path) -> dict:
    return json.loads(next(directory.glob("*.json")).read_text())


def check_accounting(document: dict) -> None:
    """Every run probed and CPU-counted; slow-run counts are ints; the
    baseline's paired ratio is exactly 1."""
    for run in document["runs"]:
        assert PER_RUN <= set(run), run["name"]
        if run["status"] == "ok":
            assert run["probe_s"] > 0
            assert run["cpu_trainer_s"] > 0 and run["cpu_workers_s"] >= 0
    for variant in document["variants"]:
        assert PER_VARIANT <= set(variant), variant["name"]
        assert type(variant["slow_runs"]) is int
        if variant["status"] == "ok":
            assert variant["cpu_trainer_s"] > 0
            assert variant["repeats_used"] == document["config"]["repeats"]
    none = [v for v in document["variants"] if v["name"] == "no callbacks"]
    assert none[0]["paired_ratio"] == 1.0
    assert none[0]["cpu_per_checkpoint_s"] is None
    raw = document["raw_write"]
    assert raw["bytes"] > 0 and raw["cpu_s"] > 0 and raw["wall_s"] > 0


@pytest.mark.foreign_threads
def test_tiny_run_of_every_variant_and_the_sweep(tmp_path, capsys):
    document = run_benchmark(["--tiny", "--sweep", "--output", str(tmp_path)])
    from variants import VARIANTS

    saved = saved_document(tmp_path)
    assert saved["config"]["tf_threads"] == 1
    assert saved["config"]["tf_intra_threads"] == 1
    assert saved["config"]["tf_inter_threads"] == 1
    assert saved["config"]["pinned"] is False
    names = [v["name"] for v in saved["variants"]]
    assert names == [v.name for v in VARIANTS if v.in_all]
    assert "no callbacks (OS-placed)" not in names  # Only when named.
    threads = {r["name"]: r["threads"] for r in saved["runs"]}
    assert threads["no callbacks"] == "apart"
    assert threads["keras"] == threads["asynccb process"] == "free"
    check_accounting(saved)
    by_name = {v["name"]: v for v in saved["variants"]}
    for name in ("asynccb defaults", "asynccb thread", "asynccb process",
                 "asynccb async", "keras", "tf.train.Checkpoint"):
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["steps_per_s"] > 0
        assert by_name[name]["paired_ratio"] > 0
        assert by_name[name]["verified"] is True, name
        # Saves at steps 2, 4 (warm-up epoch) and 6, 8 (measured).
        assert by_name[name]["checkpoints_in_window"] == 2, name
    # A .keras file's size is what the raw write writes.
    keras_runs = [r for r in saved["runs"] if r["name"] == "keras"]
    assert saved["raw_write"]["bytes"] == keras_runs[0]["checkpoint_bytes"]
    assert by_name["no callbacks"]["ratio_to_baseline"] == 1.0
    assert by_name["no callbacks"]["verified"] is None
    # TensorFlow's async checkpointing fails on Keras 3: a row says so.
    assert by_name["tf.train.Checkpoint async"]["status"] != "ok"
    assert by_name["tf.train.Checkpoint async"]["paired_ratio"] is None
    assert [row["callbacks"] for row in saved["sweep"]["callbacks"]] == [
        1, 2, 4, 8]
    assert all(row["snapshots_per_step"] == 1.0
               for row in saved["sweep"]["callbacks"])
    assert len(saved["sweep"]["sizes"]) == 2
    out = capsys.readouterr().out
    assert ("| variant | steps/s (min-max) | vs none (min-max) | n | slow | "
            "CPU s trainer/workers | CPU/ckpt ms | x raw write |") in out
    assert "| asynccb process |" in out
    assert "| no callbacks | " in out and "| 1.00 (1.00-1.00) | 1 |" in out
    assert "TF threads 1 intra-op / 1 inter-op, not pinned" in out
    assert "Raw write of" in out
    assert document["variants"] == saved["variants"]


@pytest.mark.foreign_threads
def test_tiny_single_callback_view(tmp_path, capsys):
    run_benchmark(["--tiny", "--single", "--output", str(tmp_path)])
    saved = saved_document(tmp_path)
    assert saved["config"]["mode"] == "single"
    intervals = saved["config"]["single_every"]
    assert intervals == [2, 4]
    check_accounting(saved)
    callbacks = ["keras", "asynccb thread", "asynccb process",
                 "asynccb async"]
    rows = [(v["every"], v["name"]) for v in saved["variants"]]
    assert rows == [(None, "no callbacks")] + [
        (every, name) for every in intervals for name in callbacks]
    # One no-callback run per repeat, shared by the intervals.
    assert sum(r["name"] == "no callbacks" for r in saved["runs"]) == 1
    for variant in saved["variants"][1:]:
        assert variant["status"] == "ok", variant
        assert variant["verified"] is True, variant
        assert variant["paired_ratio"] > 0
        assert variant["cpu_per_checkpoint_s"] is not None
        # 8 steps, the first 4 warm-up: saves at 6 and 8, or at 8.
        assert variant["checkpoints_in_window"] == 8 // variant["every"] - (
            4 // variant["every"])
    out = capsys.readouterr().out
    assert "| every | variant | steps/s (min-max) |" in out
    assert "| 4 | asynccb async |" in out
    assert "ModelCheckpoint alone" in out


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity")
                    or len(os.sched_getaffinity(0)) < 2,
                    reason="--pin needs 2 allowed CPUs")
def test_tiny_pinned_run(tmp_path):
    # Its own process: pinning is for the whole process, before
    # TensorFlow starts, which this test session has done long ago.
    variants = "no callbacks,keras,asynccb thread,asynccb process"
    completed, saved = run_tiny_alone(tmp_path, "--pin",
                                      "--variants", variants)
    allowed = sorted(os.sched_getaffinity(0))
    config = saved["config"]
    assert config["pinned"] is True
    assert config["trainer_cpus"] == allowed[:1]
    assert config["worker_cpus"] == allowed[1:]
    assert "pinned: training on CPU" in completed.stdout
    check_accounting(saved)
    by_name = {v["name"]: v for v in saved["variants"]}
    for name in variants.split(",")[1:]:
        assert by_name[name]["verified"] is True, by_name[name]
    # The process executor's worker ran where it was put.
    process = [r for r in saved["runs"] if r["name"] == "asynccb process"]
    assert process[0]["worker_process_cpus"] == allowed[1:]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity")
                    or len(os.sched_getaffinity(0)) < 2,
                    reason="--threads-apart needs 2 allowed CPUs")
def test_tiny_run_with_training_threads_apart(tmp_path):
    # Its own process: it configures asynccb's workers process-wide.
    variants = ("no callbacks,no callbacks (OS-placed),asynccb process,"
                "asynccb defaults + process check,keras without checkpoint,"
                "asynccb defaults without checkpoint")
    completed, saved = run_tiny_alone(tmp_path, "--threads-apart",
                                      "--variants", variants)
    allowed = sorted(os.sched_getaffinity(0))
    assert saved["config"]["threads"] == "apart"
    assert "training's threads apart" in completed.stdout
    threads = {r["name"]: r["threads"] for r in saved["runs"]}
    assert threads == {"no callbacks": "apart",
                       "no callbacks (OS-placed)": "free",
                       "asynccb process": "apart",
                       "asynccb defaults + process check": "apart",
                       "keras without checkpoint": "apart",
                       "asynccb defaults without checkpoint": "apart"}
    by_name = {v["name"]: v for v in saved["variants"]}
    checked = by_name["asynccb defaults + process check"]
    assert checked["status"] == "ok" and checked["checkpoints_in_window"] == 2
    # The mix without its checkpoint: the other callbacks ran, no save.
    for name in ("keras without checkpoint",
                 "asynccb defaults without checkpoint"):
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["paired_ratio"] > 0
        runs = [r for r in saved["runs"] if r["name"] == name]
        assert runs[0]["checkpoints"] == 0 and runs[0]["every"] is None
    # The worker process was started by a thread kept to one CPU, and
    # runs on all of them.
    process = [r for r in saved["runs"] if r["name"] == "asynccb process"]
    assert process[0]["worker_process_cpus"] == allowed
    check_accounting(saved)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                    reason="pinning needs os.sched_setaffinity")
def test_pin_needs_two_cpus(tmp_path):
    # A process allowed one CPU: --pin says why it cannot, before any
    # TensorFlow import.
    code = ("import os, sys; os.sched_setaffinity(0, {min("
            "os.sched_getaffinity(0))}); "
            f"sys.argv = ['heavy_checkpointing.py', '--pin', '--output', "
            f"{str(tmp_path)!r}]; "
            f"sys.path.insert(0, {str(BENCHMARKS)!r}); "
            "import heavy_checkpointing; heavy_checkpointing.main()")
    completed = subprocess.run([sys.executable, "-c", code],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 1
    assert "--pin needs at least 2 CPUs" in completed.stderr
    assert not list(tmp_path.iterdir())


def test_tiny_save_cost(tmp_path):
    # Its own process, as its sizes are: each size starts TensorFlow anew.
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "save_cost.py"), "--tiny",
         "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = saved_document(tmp_path)
    assert saved["args"]["repeats"] == 1 and saved["args"]["tf_threads"] == 1
    assert [row["mib"] for row in saved["sizes"]] == [1.0, 2.0]
    variants = ["none", "raw write", "keras", "asynccb thread",
                "asynccb process", "asynccb thread, page cache",
                "asynccb thread, fast off", "asynccb process, fast off",
                "raw write, pages kept"]
    for row in saved["sizes"]:
        assert row["saves"] == 3 and row["tf_intra_threads"] == 1
        assert set(row["formats"]) == {".keras", ".weights.h5"}
        for form, part in row["formats"].items():
            assert part["raw_write"][0]["bytes"] > 0
            # The writer alone wrote a file of plain Keras' size.
            writer = part["fast_writer"][0]
            keras_run = next(v for v in part["variants"]
                             if v["name"] == "keras")["runs"][0]
            assert writer["cpu_s"] > 0
            assert writer["bytes"] == keras_run["file_bytes"], form
            by_name = {v["name"]: v for v in part["variants"]}
            assert sorted(by_name) == sorted(variants), form
            for name, variant in by_name.items():
                # (Over the raw write variant's cost, which a tiny run may
                # measure as nothing: nan.)
                assert math.isfinite(variant["over_raw_write_apart"]), (
                    form, name)
                assert math.isfinite(variant["cpu_per_checkpoint_s"])
                assert variant["wall_vs_none"] > 0
                expected = 0 if name == "none" else row["saves"]
                assert variant["runs"][0]["files"] == expected, (form, name)
            for name in ("asynccb thread", "asynccb process",
                         "asynccb thread, page cache"):
                assert "fast" in by_name[name]["save_paths"], (form, name)
    out = completed.stdout
    assert ("| state MiB | saves | one raw write apart ms | fast save "
            "writer apart ms (x) | raw write | keras |") in out
    assert "TF threads 1 intra-op / 1 inter-op; 1 interleaved repeats" in out


def test_tiny_memory_per_fit_run(tmp_path):
    # Each variant in a fresh process of its own, as the benchmark runs it.
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "memory_per_fit.py"), "--fits",
         "3", "--width", "32", "--repeats", "1", "--output", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads((tmp_path / "memory_per_fit.json").read_text())
    rows = {row["variant"]: row for row in document["variants"]}
    assert list(rows) == ["keras", "asynccb thread", "asynccb process"]
    for name, row in rows.items():
        # Every fit's model was collected once dropped (the wrapper kept
        # it, and itself, before bb54ccb).
        assert row["models_alive"] == 0, name
        assert isinstance(row["trainer_bytes_per_fit"], float), name
    runs = {run["variant"]: run for run in document["runs"]}
    assert all(len(run["trainer_rss"]) == 3 for run in runs.values())
    assert set(runs["keras"]["workers_rss"]) == {0}
    assert min(runs["asynccb process"]["workers_rss"]) > 0
    assert "| asynccb process |" in done.stdout


def test_tiny_non_chief_run():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "non_chief.py"), "--repeats", "1",
         "--calls", "20"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "snapshots 0, offloaded calls 0, files written []" in done.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="places threads on two CPUs")
def test_tiny_thread_placement_run(tmp_path):
    figures = tmp_path / "placement.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "thread_placement.py"),
         "--repeats", "1", "--steps", "4", "--width", "16",
         "--json", str(figures)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modes = json.loads(figures.read_text())["modes"]
    assert sorted(modes) == ["apart", "free", "together"]
    assert all(row["steps_per_s"] > 0 for row in modes.values())
    assert "together" in done.stdout and "apart" in done.stdout


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="places threads on two CPUs")
def test_placed_apart_keeps_the_threads_on_two_cpus_then_frees_them():
    import tensorflow as tf

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from placement import placed, tensorflow_threads
    finally:
        sys.path.remove(str(BENCHMARKS))
    tf.constant(1.0) + 1.0  # TensorFlow's pools exist.
    cpus = os.sched_getaffinity(0)
    first, second = sorted(cpus)[:2]
    compute = tensorflow_threads()
    assert compute
    with placed("apart") as moved:
        assert moved
        assert os.sched_getaffinity(0) == {first}
        assert {frozenset(os.sched_getaffinity(t)) for t in compute} == {
            frozenset({second})}
    assert os.sched_getaffinity(0) == cpus
    assert all(os.sched_getaffinity(t) == cpus for t in compute)
    with placed("free") as moved:
        assert not moved and os.sched_getaffinity(0) == cpus
    with pytest.raises(ValueError, match="placement 'aside'"):
        with placed("aside"):
            pass


def test_tiny_chief_cost_run(tmp_path):
    figures = tmp_path / "chief.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "chief_cost.py"), "--repeats", "1",
         "--epochs", "2", "--json", str(figures)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    (run,) = result["runs"]
    assert run["one_worker_ms"] > 0 and run["two_workers_chief_ms"] > 0
    assert result["ratio_median"] == run["ratio"]
    assert "chief of two workers / one worker" in done.stdout
