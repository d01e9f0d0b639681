"""The benchmark's arithmetic (benchmarks/report.py), on synthetic runs,
without TensorFlow: paired ratios, the slow-run rule, CPU per checkpoint,
the table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
try:
    import report
finally:  # The benchmarks' module names are theirs alone.
    sys.path.remove(str(BENCHMARKS))

BASE = "no callbacks"


def run(name: str, repeat: int, steps_per_s: float, probe_s: float = 0.07,
        every: int | None = 20, cpu: tuple[float, float] = (5.0, 0.0),
        checkpoints: int = 10, status: str = "ok") -> dict:
    """A run as `runner.run_once` records it, with the fields summarize
    reads."""
    saves = name != BASE
    return {
        "name": name, "note": "", "repeat": repeat, "status": status,
        "every": every if saves else None, "steps_per_s": steps_per_s,
        "probe_s": probe_s, "wall_s": 5.0, "warmup_s": 1.0,
        "save_times": [0.003] * checkpoints if saves else [],
        "end_wait_s": 0.1 if saves else None, "memcpy_s": None,
        "peak_rss_bytes": 2**30, "checkpoints": checkpoints if saves else 0,
        "checkpoints_in_window": checkpoints if saves else 0,
        "cpu_trainer_s": cpu[0], "cpu_workers_s": cpu[1],
        "verified": True if saves else None,
    }


def by_name(entries: list[dict]) -> dict[tuple, dict]:
    return {(e["every"], e["name"]): e for e in entries}


def test_paired_ratio_leaves_out_a_slow_repeat():
    runs = []
    ratios = [0.78, 0.80, 0.82, 0.80, 0.30]  # The last repeat: slow probe.
    for repeat, ratio in enumerate(ratios):
        base = 100.0 + repeat  # Drift: pairing cancels it.
        slow_probe = 0.2 if repeat == 4 else 0.07
        runs += [run(BASE, repeat, base),
                 run("keras", repeat, ratio * base, probe_s=slow_probe)]
    entries = by_name(report.summarize(runs, BASE))
    keras = entries[20, "keras"]
    assert keras["paired_ratio"] == pytest.approx(0.80)
    assert keras["paired_ratio_min"] == pytest.approx(0.78)
    assert keras["paired_ratio_max"] == pytest.approx(0.82)
    assert keras["repeats_used"] == 4
    assert keras["slow_runs"] == 1
    none = entries[None, BASE]
    assert none["paired_ratio"] == 1.0
    assert (none["paired_ratio_min"], none["paired_ratio_max"]) == (1.0, 1.0)
    assert none["repeats_used"] == 5 and none["slow_runs"] == 0


def test_a_slow_baseline_makes_its_whole_repeat_slow():
    runs = []
    for repeat in range(5):
        base = 60.0 if repeat == 2 else 100.0  # 1.67x below the median.
        runs += [run(BASE, repeat, base), run("keras", repeat, 80.0),
                 run("asynccb thread", repeat, 90.0)]
    reasons = report.slow_reasons(runs, BASE)
    assert [bool(why) for why in reasons] == [
        repeat == 2 for repeat in range(5) for _ in range(3)]
    assert "no callbacks run 1.67x slower" in reasons[6]
    entries = by_name(report.summarize(runs, BASE))
    for key in ((20, "keras"), (20, "asynccb thread")):
        assert entries[key]["repeats_used"] == 4
        assert entries[key]["slow_runs"] == 1
    assert entries[20, "keras"]["paired_ratio"] == pytest.approx(0.8)
    assert entries[20, "keras"]["paired_ratio_max"] == pytest.approx(0.8)


def test_fewer_than_three_clean_repeats_use_every_repeat():
    runs = []
    for repeat in range(3):
        runs += [run(BASE, repeat, 100.0),
                 run("keras", repeat, 50.0 if repeat == 0 else 80.0,
                     probe_s=0.2 if repeat == 0 else 0.07)]
    keras = by_name(report.summarize(runs, BASE))[20, "keras"]
    assert keras["repeats_used"] == 3
    assert keras["slow_runs"] == 1
    assert keras["paired_ratio_min"] == pytest.approx(0.5)


@pytest.mark.parametrize("probe, slow", [(0.091, False), (0.0911, True)])
def test_slow_means_more_than_1_3_times_the_median_probe(probe, slow):
    runs = [run(BASE, r, 100.0) for r in range(4)] + [
        run("keras", 0, 80.0, probe_s=probe)]
    # The median of the probes is 0.07: 1.3x of it is 0.091.
    assert bool(report.slow_reasons(runs, BASE)[-1]) is slow


def test_mark_slow_and_the_warning_name_the_runs():
    runs = [run(BASE, r, 100.0) for r in range(3)] + [
        run("keras", 1, 80.0, probe_s=0.5)]
    slow = report.mark_slow(runs, BASE)
    assert slow == [runs[-1]]
    assert [r["slow"] for r in runs] == [False, False, False, True]
    warning = report.slow_warning(slow)
    assert warning.startswith("warning: 1 slow run(s)")
    assert "keras every 20 repeat 2 (probe 7.14x the median)" in warning
    assert report.slow_warning([]) is None


def test_cpu_per_checkpoint_subtracts_the_same_repeats_baseline():
    runs = []
    for repeat in range(3):
        runs += [run(BASE, repeat, 100.0, cpu=(4.0 + repeat, 0.0)),
                 run("asynccb process", repeat, 90.0,
                     cpu=(4.5 + repeat, 1.5), checkpoints=10)]
    entries = by_name(report.summarize(runs, BASE, raw_write_cpu_s=0.05))
    process = entries[20, "asynccb process"]
    assert process["cpu_per_checkpoint_s"] == pytest.approx(0.2)
    assert process["cpu_per_checkpoint_over_raw_write"] == pytest.approx(4.0)
    assert process["cpu_trainer_s"] == pytest.approx(5.5)
    assert process["cpu_workers_s"] == pytest.approx(1.5)
    none = entries[None, BASE]
    assert none["cpu_per_checkpoint_s"] is None
    assert none["cpu_per_checkpoint_over_raw_write"] is None


def test_intervals_share_the_baseline_of_their_repeat():
    runs = []
    for repeat in range(3):
        runs.append(run(BASE, repeat, 100.0))
        for every, ratio in ((5, 0.5), (100, 0.95)):
            runs += [run("keras", repeat, ratio * 100.0, every=every),
                     run("asynccb process", repeat, 90.0, every=every)]
    entries = report.summarize(runs, BASE)
    assert [(e["every"], e["name"]) for e in entries] == [
        (None, BASE), (5, "keras"), (5, "asynccb process"),
        (100, "keras"), (100, "asynccb process")]
    ratios = {(e["every"], e["name"]): e["paired_ratio"] for e in entries}
    assert ratios[5, "keras"] == pytest.approx(0.5)
    assert ratios[100, "keras"] == pytest.approx(0.95)
    table = report.markdown_table(entries, by_interval=True)
    assert "| every | variant | steps/s (min-max) | vs none (min-max) | n |" \
        in table
    assert "| 5 | keras | 50.0 (50.0-50.0) | 0.50 (0.50-0.50) | 3 | 0 |" \
        in table


def test_failed_variant_has_no_ratio_and_a_row_saying_why():
    runs = []
    for repeat in range(3):
        runs += [run(BASE, repeat, 100.0),
                 run("tf async", repeat, None, status="error: ValueError")]
    failed = by_name(report.summarize(runs, BASE))[20, "tf async"]
    assert failed["paired_ratio"] is None and failed["repeats_used"] == 0
    table = report.markdown_table(report.summarize(runs, BASE))
    assert "| tf async | error: ValueError |" in table


def test_table_shows_the_paired_ratio_and_its_range():
    runs = []
    for repeat, ratio in enumerate([0.66, 0.80, 0.86]):
        runs += [run(BASE, repeat, 100.0), run("keras", repeat, ratio * 100)]
    table = report.markdown_table(report.summarize(runs, BASE, 0.02))
    header, rule, none, keras = table.splitlines()
    assert header.count("|") == rule.count("|") == none.count("|")
    assert "| none |" not in table
    assert "| 0.80 (0.66-0.86) | 3 | 0 |" in keras
    assert "| 1.00 (1.00-1.00) |" in none


def test_report_loads_without_heavy_libraries():
    # In a fresh interpreter: this session may have loaded them.
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
            "import report; "
            "assert not {'tensorflow', 'keras', 'numpy', 'matplotlib'} & "
            "set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_fast_baseline_makes_its_whole_repeat_an_outlier_too():
    """A no-callback run far above its median (seen pinned: 61.7 steps/s
    beside 31) would make every ratio of its repeat too low."""
    runs = []
    for repeat in range(5):
        base = 200.0 if repeat == 1 else 100.0
        runs += [run(BASE, repeat, base), run("keras", repeat, 80.0)]
    reasons = report.slow_reasons(runs, BASE)
    assert [bool(why) for why in reasons] == [
        repeat == 1 for repeat in range(5) for _ in range(2)]
    assert "no callbacks run 2.00x faster" in reasons[2]
    keras = by_name(report.summarize(runs, BASE))[20, "keras"]
    assert keras["repeats_used"] == 4
    assert keras["paired_ratio"] == pytest.approx(0.8)
