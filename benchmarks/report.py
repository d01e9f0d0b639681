"""Summaries of benchmark runs: paired ratios, slow runs, CPU per
checkpoint, medians, the Markdown table, JSON, plots.

Imports nothing heavy (NumPy and matplotlib only inside the functions
that need them), so that its arithmetic is tested without TensorFlow.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from typing import Any, Callable

# A run is slow when the machine was at least this much slower than usual
# (by the probe before it, or by its repeat's no-callback run).
SLOW_FACTOR = 1.3
# Fewer clean repeats than this and the paired figures use every repeat.
MIN_CLEAN_REPEATS = 3

Key = tuple  # (save interval or None, variant name): one row.


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ok(run: dict) -> bool:
    return run["status"] == "ok"


def _key(run: dict) -> Key:
    return (run.get("every"), run["name"])


def slow_reasons(runs: list[dict], baseline: str,
                 factor: float = SLOW_FACTOR) -> list[str | None]:
    """Why each run of `runs` counts as slow, or `None` if it does not.

    A run is slow if its probe took more than `factor` times the median
    probe of the whole benchmark, or if the `baseline` run of its repeat
    is `factor` times away from the median baseline steps/s either way (a
    slow stretch during that repeat, which the probe may have missed, or
    a baseline run that was fast alone: its repeat's ratios are off too).
    """
    probes = [r["probe_s"] for r in runs if r.get("probe_s")]
    usual_probe = _median(probes)
    base_speed = {r["repeat"]: r["steps_per_s"] for r in runs
                  if r["name"] == baseline and _ok(r) and r["steps_per_s"]}
    usual_speed = _median(list(base_speed.values()))
    reasons: list[str | None] = []
    for run in runs:
        why = []
        probe = run.get("probe_s")
        if usual_probe and probe and probe > factor * usual_probe:
            why.append(f"probe {probe / usual_probe:.2f}x the median")
        speed = base_speed.get(run["repeat"])
        if usual_speed and speed and usual_speed > factor * speed:
            why.append(f"its repeat's {baseline} run "
                       f"{usual_speed / speed:.2f}x slower than the median")
        elif usual_speed and speed and speed > factor * usual_speed:
            why.append(f"its repeat's {baseline} run "
                       f"{speed / usual_speed:.2f}x faster than the median")
        reasons.append("; ".join(why) or None)
    return reasons


def mark_slow(runs: list[dict], baseline: str) -> list[dict]:
    """Sets each run's `slow` (bool) and `slow_reason`; returns the slow
    runs."""
    for run, reason in zip(runs, slow_reasons(runs, baseline)):
        run["slow"], run["slow_reason"] = reason is not None, reason
    return [run for run in runs if run["slow"]]


def slow_warning(slow: list[dict]) -> str | None:
    """One line naming the slow runs (`None` if there are none)."""
    if not slow:
        return None
    named = "; ".join(
        f"{r['name']}" + (f" every {r['every']}" if r.get("every") else "")
        + f" repeat {r['repeat'] + 1} ({r['slow_reason']})" for r in slow)
    return (f"warning: {len(slow)} slow run(s) (the machine, or its "
            f"repeat's baseline, >{SLOW_FACTOR}x off its usual speed), "
            f"left out of paired figures where "
            f"{MIN_CLEAN_REPEATS} clean repeats remain: {named}")


def used_pairs(group: list[dict], bases: dict[int, dict],
               is_slow: Callable[[dict], bool]) -> list[tuple[dict, dict]]:
    """(run, baseline run of its repeat) for the repeats the paired
    figures use: those where neither run is slow, or every repeat if that
    leaves fewer than `MIN_CLEAN_REPEATS`."""
    pairs = [(run, bases[run["repeat"]]) for run in group
             if _ok(run) and run["repeat"] in bases]
    clean = [(run, base) for run, base in pairs
             if not is_slow(run) and not is_slow(base)]
    return clean if len(clean) >= MIN_CLEAN_REPEATS else pairs


def paired_ratio(pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """Median, min and max over `pairs` of the run's steps/s over its
    repeat's baseline steps/s: runs back to back share the machine's
    state, so their ratio is steadier than a ratio of medians."""
    ratios = [run["steps_per_s"] / base["steps_per_s"]
              for run, base in pairs]
    return {
        "paired_ratio": _median(ratios),
        "paired_ratio_min": min(ratios) if ratios else None,
        "paired_ratio_max": max(ratios) if ratios else None,
        "repeats_used": len(ratios),
    }


def _cpu(run: dict) -> float | None:
    if run.get("cpu_trainer_s") is None or run.get("cpu_workers_s") is None:
        return None
    return run["cpu_trainer_s"] + run["cpu_workers_s"]


def cpu_per_checkpoint(pairs: list[tuple[dict, dict]]) -> float | None:
    """Median over `pairs` of (the run's CPU seconds, training process and
    workers, minus its repeat's baseline's) per checkpoint written in the
    measured window: what the callbacks cost the machine per checkpoint
    (every callback of the run, not only the checkpoint's)."""
    costs = [(_cpu(run) - _cpu(base)) / run["checkpoints_in_window"]
             for run, base in pairs
             if run.get("checkpoints_in_window")
             and _cpu(run) is not None and _cpu(base) is not None]
    return _median(costs)


def summarize(runs: list[dict], baseline: str,
              raw_write_cpu_s: float | None = None) -> list[dict]:
    """One entry per row (variant, or save interval and variant): paired
    ratios to `baseline` over the clean repeats, slow runs, CPU, and
    medians (with min and max) over its runs.

    Args:
        runs: Every run; `repeat` pairs a run with the `baseline` run of
            the same repeat (one per repeat, shared by save intervals).
        baseline: The name of the variant without callbacks.
        raw_write_cpu_s: CPU seconds of a raw write of one checkpoint's
            bytes, to compare the CPU per checkpoint with.
    """
    slow = {id(run) for run, why in zip(runs, slow_reasons(runs, baseline))
            if why}
    bases = {r["repeat"]: r for r in runs if r["name"] == baseline and _ok(r)}
    groups: dict[Key, list[dict]] = {}
    for run in runs:
        groups.setdefault(_key(run), []).append(run)
    base_speed = _median([r["steps_per_s"] for r in bases.values()])
    entries = []
    for (every, name), group in groups.items():
        pairs = used_pairs(group, bases, lambda run: id(run) in slow)
        per_checkpoint = cpu_per_checkpoint(pairs)
        entry = {
            "name": name,
            "every": every,
            **_medians(group, base_speed),
            **paired_ratio(pairs),
            "slow_runs": sum(id(run) in slow for run in group),
            "cpu_per_checkpoint_s": per_checkpoint,
            "cpu_per_checkpoint_over_raw_write": (
                per_checkpoint / raw_write_cpu_s
                if per_checkpoint is not None and raw_write_cpu_s else None),
        }
        entries.append(entry)
    return entries


def _medians(group: list[dict], base_speed: float | None) -> dict[str, Any]:
    """A row's medians over its successful runs (and its status)."""
    ok = [r for r in group if _ok(r)]
    speeds = [r["steps_per_s"] for r in ok]
    stalls = [t for r in ok for t in r["save_times"]]
    return {
        "note": group[0]["note"],
        "status": ok and "ok" or group[0]["status"],
        "runs": len(group),
        "steps_per_s": _median(speeds),
        "steps_per_s_min": min(speeds) if speeds else None,
        "steps_per_s_max": max(speeds) if speeds else None,
        # A ratio of medians, kept for comparison with earlier results;
        # the headline figure is `paired_ratio`.
        "ratio_to_baseline": (_median(speeds) / base_speed
                              if speeds and base_speed else None),
        "wall_s": _median([r["wall_s"] for r in ok]),
        "warmup_s": _median([r["warmup_s"] for r in ok]),
        "stall_p50_s": _percentile(stalls, 50),
        "stall_p99_s": _percentile(stalls, 99),
        "end_wait_s": _median([r["end_wait_s"] for r in ok]),
        "memcpy_floor_s": _median([r["memcpy_s"] for r in group]),
        "peak_rss_bytes": _median([r["peak_rss_bytes"] for r in ok]),
        "checkpoints": _median([r["checkpoints"] for r in ok]),
        "checkpoints_in_window": _median(
            [r.get("checkpoints_in_window") for r in ok]),
        "cpu_trainer_s": _median([r.get("cpu_trainer_s") for r in ok]),
        "cpu_workers_s": _median([r.get("cpu_workers_s") for r in ok]),
        # Every checkpoint of every run equal to plain Keras' (None: it
        # wrote none, or there was no plain Keras run to compare with).
        "verified": _all_verified(ok),
    }


def _all_verified(runs: list[dict]):
    verdicts = [r["verified"] for r in runs if r["checkpoints"]]
    if not verdicts or any(v is None for v in verdicts):
        return None
    return all(verdicts)


def _percentile(values, q):
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def _fmt(value, scale=1.0, digits=2, unit=""):
    if value is None:
        return "n/a"
    return f"{value * scale:.{digits}f}{unit}"


def _fmt_two(first, second, scale=1.0, digits=2) -> str:
    """`first/second`, or a single "n/a" if neither is known."""
    if first is None and second is None:
        return "n/a"
    return f"{_fmt(first, scale, digits)}/{_fmt(second, scale, digits)}"


_COLUMNS = [
    ("steps/s (min-max)", lambda v: (
        f"{_fmt(v['steps_per_s'], digits=1)} "
        f"({_fmt(v['steps_per_s_min'], digits=1)}-"
        f"{_fmt(v['steps_per_s_max'], digits=1)})")),
    ("vs none (min-max)", lambda v: (
        f"{_fmt(v['paired_ratio'])} ({_fmt(v['paired_ratio_min'])}-"
        f"{_fmt(v['paired_ratio_max'])})")),
    ("n", lambda v: str(v["repeats_used"])),
    ("slow", lambda v: str(v["slow_runs"])),
    ("CPU s trainer/workers", lambda v: _fmt_two(v["cpu_trainer_s"],
                                                 v["cpu_workers_s"])),
    ("CPU/ckpt ms", lambda v: _fmt(v["cpu_per_checkpoint_s"], 1e3, 1)),
    ("x raw write", lambda v: _fmt(v["cpu_per_checkpoint_over_raw_write"],
                                   digits=1)),
    ("stall p50/p99 ms", lambda v: _fmt_two(v["stall_p50_s"],
                                            v["stall_p99_s"], 1e3, 1)),
    ("memcpy floor ms", lambda v: _fmt(v["memcpy_floor_s"], 1e3, 1)),
    ("end wait ms", lambda v: _fmt(v["end_wait_s"], 1e3, 0)),
    ("warm-up s", lambda v: _fmt(v["warmup_s"])),
    ("peak RSS MiB", lambda v: _fmt(v["peak_rss_bytes"], 2**-20, 0)),
    ("verified", lambda v: {True: "yes", False: "**FAILED**",
                            None: "-"}[v["verified"]]),
]


def markdown_table(variants: list[dict], by_interval: bool = False) -> str:
    """The summary as a Markdown table; `by_interval` adds a first column,
    the save interval (the single-callback view)."""
    head = (["every"] if by_interval else []) + ["variant"] + [
        title for title, _ in _COLUMNS]
    rows = ["| " + " | ".join(head) + " |",
            "| " + " | ".join("---" for _ in head) + " |"]
    for v in variants:
        first = ([str(v["every"] or "-")] if by_interval else []) + [v["name"]]
        if v["status"] != "ok":
            cells = first + [v["status"]] + [""] * (len(_COLUMNS) - 1)
        else:
            cells = first + [cell(v) for _, cell in _COLUMNS]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_tables(sweep: dict) -> str:
    lines = []
    if sweep.get("sizes"):
        lines += [
            "| state | memcpy (apart) | snapshot (private) | snapshot (shared) "
            "| memcpy in the run | trainer per checkpoint p50 | p99 | "
            "p50 / memcpy in the run |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in sweep["sizes"]:
            if "error" in row:
                lines.append(f"| {row['state_bytes'] / 2**20:.0f} MiB | "
                             f"failed: {row['error']} |" + " |" * 6)
                continue
            lines.append(
                f"| {row['state_bytes'] / 2**20:.0f} MiB "
                f"| {_fmt(row['memcpy_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['snapshot_private_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['snapshot_shared_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['memcpy_in_run_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['stall_p50_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['stall_p99_s'], 1e3, 2, ' ms')} "
                f"| {_fmt(row['stall_p50_s'] / row['memcpy_in_run_s'])} |"
            )
    if sweep.get("callbacks"):
        lines += [
            "",
            "| offloaded callbacks needing the model at the step | "
            "trainer per step p50 | p99 | snapshots per step |",
            "| --- | --- | --- | --- |",
        ]
        for row in sweep["callbacks"]:
            lines.append(
                f"| {row['callbacks']} | {_fmt(row['stall_p50_s'], 1e3, 2, ' ms')}"
                f" | {_fmt(row['stall_p99_s'], 1e3, 2, ' ms')} "
                f"| {row['snapshots_per_step']:.2f} |"
            )
    return "\n".join(lines)


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2, default=float)


def plot_throughput(variants: list[dict], path: str, title: str) -> bool:
    """Bars of each variant's paired ratio to the no-callback run (median,
    min-max); `False` if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [v for v in variants
             if v["status"] == "ok" and v["paired_ratio"] is not None]
    names = [v["name"] for v in shown]
    medians = [v["paired_ratio"] for v in shown]
    low = [v["paired_ratio"] - v["paired_ratio_min"] for v in shown]
    high = [v["paired_ratio_max"] - v["paired_ratio"] for v in shown]
    colors = ["#999999" if v["verified"] is None else
              "#2a7" if v["verified"] else "#c33" for v in shown]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
    axis.invert_yaxis()
    axis.set_xlabel("steps/s over the same repeat's no-callback run "
                    "(median, min-max)")
    axis.set_title(textwrap.fill(title, 110), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_sweep(sweep: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [row for row in sweep.get("sizes", []) if "error" not in row]
    if sizes:
        mib = [r["state_bytes"] / 2**20 for r in sizes]
        axis = axes[0]
        axis.loglog(mib, [r["memcpy_in_run_s"] * 1e3 for r in sizes], "k--",
                    label="memcpy of the same bytes, in the run (floor)")
        axis.loglog(mib, [r["memcpy_s"] * 1e3 for r in sizes], "k:",
                    label="memcpy, measured apart (warm cache)")
        axis.loglog(mib, [r["snapshot_shared_s"] * 1e3 for r in sizes], "o-",
                    label="snapshot into shared memory")
        axis.loglog(mib, [r["stall_p50_s"] * 1e3 for r in sizes], "s-",
                    label="training thread per checkpoint (p50)")
        axis.set_xlabel("model state (weights + Adam), MiB")
        axis.set_ylabel("ms")
        axis.legend(fontsize=8)
        axis.set_title("cost per checkpoint vs state size", fontsize=10)
    counts = sweep.get("callbacks", [])
    if counts:
        axis = axes[1]
        axis.plot([r["callbacks"] for r in counts],
                  [r["stall_p50_s"] * 1e3 for r in counts], "o-",
                  label="training thread per step (p50)")
        axis.set_xlabel("offloaded callbacks needing the model at the step")
        axis.set_ylabel("ms")
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
        axis.set_title("one shared snapshot per step", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
