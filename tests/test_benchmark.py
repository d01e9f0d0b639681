"""The benchmark harness runs every variant and reports in the documented
shape (its timings are not tested: they are the benchmark's business)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.foreign_threads
def test_tiny_run_of_every_variant(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import heavy_checkpointing
        from variants import VARIANTS

        document = heavy_checkpointing.main(
            ["--tiny", "--sweep", "--output", str(tmp_path)])
    finally:
        sys.path.remove(str(BENCHMARKS))
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["config"]["tf_threads"] == 1
    names = [v["name"] for v in saved["variants"]]
    assert names == [v.name for v in VARIANTS]
    fields = {"name", "steps_per_s", "ratio_to_baseline", "stall_p50_s",
              "stall_p99_s", "memcpy_floor_s", "peak_rss_bytes", "verified"}
    by_name = {v["name"]: v for v in saved["variants"]}
    for variant in saved["variants"]:
        assert fields <= set(variant)
    for name in ("asynccb defaults", "asynccb thread", "asynccb process",
                 "asynccb async", "keras", "tf.train.Checkpoint"):
        assert by_name[name]["status"] == "ok", by_name[name]
        assert by_name[name]["steps_per_s"] > 0
        assert by_name[name]["verified"] is True, name
    assert by_name["no callbacks"]["ratio_to_baseline"] == 1.0
    assert by_name["no callbacks"]["verified"] is None
    # TensorFlow's async checkpointing fails on Keras 3: a row says so.
    assert by_name["tf.train.Checkpoint async"]["status"] != "ok"
    assert [row["callbacks"] for row in saved["sweep"]["callbacks"]] == [
        1, 2, 4, 8]
    assert all(row["snapshots_per_step"] == 1.0
               for row in saved["sweep"]["callbacks"])
    assert len(saved["sweep"]["sizes"]) == 2
    out = capsys.readouterr().out
    assert "| variant | steps/s (min-max) |" in out
    assert "| asynccb process |" in out
    assert document["variants"] == saved["variants"]
