"""Summaries of benchmark runs: medians, the Markdown table, JSON, plots."""

from __future__ import annotations

import json
import statistics
from typing import Any


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict], baseline: str) -> list[dict]:
    """One entry per variant: medians (with min and max) over its runs."""
    by_variant: dict[str, list[dict]] = {}
    for run in runs:
        by_variant.setdefault(run["name"], []).append(run)
    base = _median([r["steps_per_s"] for r in by_variant.get(baseline, [])
                    if r["status"] == "ok"])
    variants = []
    for name, group in by_variant.items():
        ok = [r for r in group if r["status"] == "ok"]
        speeds = [r["steps_per_s"] for r in ok]
        stalls = [t for r in ok for t in r["save_times"]]
        entry = {
            "name": name,
            "note": group[0]["note"],
            "status": ok and "ok" or group[0]["status"],
            "runs": len(group),
            "steps_per_s": _median(speeds),
            "steps_per_s_min": min(speeds) if speeds else None,
            "steps_per_s_max": max(speeds) if speeds else None,
            "ratio_to_baseline": (_median(speeds) / base
                                  if speeds and base else None),
            "wall_s": _median([r["wall_s"] for r in ok]),
            "warmup_s": _median([r["warmup_s"] for r in ok]),
            "stall_p50_s": _percentile(stalls, 50),
            "stall_p99_s": _percentile(stalls, 99),
            "end_wait_s": _median([r["end_wait_s"] for r in ok]),
            "memcpy_floor_s": _median([r["memcpy_s"] for r in group]),
            "peak_rss_bytes": _median([r["peak_rss_bytes"] for r in ok]),
            "checkpoints": _median([r["checkpoints"] for r in ok]),
            # Every checkpoint of every run equal to plain Keras' (None: it
            # wrote none, or there was no plain Keras run to compare with).
            "verified": _all_verified(ok),
        }
        variants.append(entry)
    return variants


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


def markdown_table(variants: list[dict]) -> str:
    header = (
        "| variant | steps/s (min-max) | vs none | wall s | warm-up s | "
        "stall p50 | stall p99 | memcpy floor | end wait | peak RSS | "
        "verified |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = [header]
    for v in variants:
        if v["status"] != "ok":
            rows.append(f"| {v['name']} | {v['status']} |" + " |" * 9)
            continue
        verified = {True: "yes", False: "**FAILED**", None: "-"}[v["verified"]]
        rows.append(
            f"| {v['name']} | {_fmt(v['steps_per_s'], digits=1)} "
            f"({_fmt(v['steps_per_s_min'], digits=1)}-"
            f"{_fmt(v['steps_per_s_max'], digits=1)}) "
            f"| {_fmt(v['ratio_to_baseline'])} | {_fmt(v['wall_s'])} "
            f"| {_fmt(v['warmup_s'])} "
            f"| {_fmt(v['stall_p50_s'], 1e3, 1, ' ms')} "
            f"| {_fmt(v['stall_p99_s'], 1e3, 1, ' ms')} "
            f"| {_fmt(v['memcpy_floor_s'], 1e3, 1, ' ms')} "
            f"| {_fmt(v['end_wait_s'], 1e3, 0, ' ms')} "
            f"| {_fmt(v['peak_rss_bytes'], 2**-20, 0, ' MiB')} "
            f"| {verified} |"
        )
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [v for v in variants if v["status"] == "ok"]
    names = [v["name"] for v in shown]
    medians = [v["steps_per_s"] for v in shown]
    low = [v["steps_per_s"] - v["steps_per_s_min"] for v in shown]
    high = [v["steps_per_s_max"] - v["steps_per_s"] for v in shown]
    colors = ["#999999" if v["verified"] is None else
              "#2a7" if v["verified"] else "#c33" for v in shown]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    axis.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
    axis.invert_yaxis()
    axis.set_xlabel("training steps per second (median, min-max)")
    axis.set_title(title, fontsize=10)
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
