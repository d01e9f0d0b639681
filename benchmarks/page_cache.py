"""Page cache: what a write costs when its pages stay cached, and when they
are dropped once synced (as asynccb's saves do).

No TensorFlow: this measures the machine. Each repeat writes a burst of new
files (`os.write` in 8 MiB pieces, `fsync`), first with each file's pages
dropped from the page cache after its `fsync` (`posix_fadvise`
`POSIX_FADV_DONTNEED`), then keeping them; the kept files stay until the
end, as a run's checkpoints do, so every kept write takes pages no file
freed just before. Each write's CPU (user + system, this process) over a
single write apart (one file, written and removed: its pages are reused)
is the figure; medians over writes and repeats, with min-max of the
repeats' medians.

On a VM whose free memory goes back to its host (virtio-balloon free page
reporting, reported below), a page the guest has not used for a while
costs a fault in the host when touched again: kept pages cost many times
their copy there; dropped ones are reused by the next write.

Run from the repository root:

    python benchmarks/page_cache.py            10 and 100 MiB, 5 repeats
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCHMARKS)

from raw_writes import own_cpu_seconds, write_and_sync  # noqa: E402

_BALLOON, _FREE_PAGE_REPORTING = "0x0005", 5  # virtio ids (spec 5.5.3).


def free_page_reporting() -> bool | None:
    """Whether a virtio balloon reports free pages to the host (`None`: no
    balloon seen)."""
    for device in glob.glob("/sys/bus/virtio/devices/*"):
        try:
            with open(os.path.join(device, "device")) as file:
                if file.read().strip() != _BALLOON:
                    continue
            with open(os.path.join(device, "features")) as file:
                return file.read().strip()[_FREE_PAGE_REPORTING] == "1"
        except OSError:
            continue
    return None


def timed_write(path: str, payload: memoryview, keep_cached: bool) -> float:
    """CPU seconds of writing `payload` to a new file at `path`."""
    start = own_cpu_seconds()
    write_and_sync(path, payload, keep_cached)
    return own_cpu_seconds() - start


def measure(mib: float, writes: int, repeats: int,
            directory: str) -> dict[str, object]:
    payload = memoryview(np.random.default_rng(0).bytes(int(mib * 2**20)))
    apart, dropped, kept = [], [], []
    for repeat in range(repeats):
        single = os.path.join(directory, "apart.bin")
        apart.append(timed_write(single, payload, keep_cached=True))
        os.remove(single)
        for keep, into in ((False, dropped), (True, kept)):
            costs = [timed_write(
                os.path.join(directory, f"{keep}-{repeat}-{i}.bin"),
                payload, keep) for i in range(writes)]
            into.append(costs)
        for path in glob.glob(os.path.join(directory, f"False-{repeat}-*")):
            os.remove(path)
    one = statistics.median(apart)

    def row(costs: list[list[float]]) -> dict[str, float]:
        medians = [statistics.median(c) for c in costs]
        return {"ms": statistics.median(sum(costs, [])) * 1e3,
                "x_apart": statistics.median(sum(costs, [])) / one,
                "x_min": min(medians) / one, "x_max": max(medians) / one}

    return {"mib": mib, "writes": writes, "repeats": repeats,
            "apart_ms": one * 1e3, "dropped": row(dropped),
            "kept": row(kept)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100", help="MiB per write")
    parser.add_argument("--writes", type=int, default=10,
                        help="writes per burst")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"free page reporting: {free_page_reporting()}")
    print("| MiB | one write apart ms | pages dropped ms (x apart, min-max)"
          " | pages kept ms (x apart, min-max) |")
    print("| --- | --- | --- | --- |")
    for mib in (float(size) for size in args.sizes.split(",")):
        directory = tempfile.mkdtemp(dir=os.path.join(BENCHMARKS, ".."))
        try:
            found = measure(mib, args.writes, args.repeats, directory)
        finally:
            shutil.rmtree(directory)
        cells = [f"{found[k]['ms']:.1f} ({found[k]['x_apart']:.1f}x, "
                 f"{found[k]['x_min']:.1f}-{found[k]['x_max']:.1f})"
                 for k in ("dropped", "kept")]
        print(f"| {mib:g} | {found['apart_ms']:.1f} | " + " | ".join(cells)
              + " |")


if __name__ == "__main__":
    main()
