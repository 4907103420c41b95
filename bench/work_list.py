"""The driver's memory for planning a run: listing a Parquet manifest and leaving out what is settled.

    python -m bench.work_list [--sizes 100000,1000000]

For N paths in a Parquet manifest, half of them settled by an earlier run's parts (error rows, which
settle an image as annotation rows do), each size in a fresh process: peak RSS after
`pipeline.job.work_items` built the work list, and the size of that list. No model runs: this is the
per-image state the driver holds before the Ray plan starts (issue 15's goal: 1M within 1.2x of 100k).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench import in_fresh_process


def make(folder: Path, count: int) -> None:
    """The manifest, and an earlier run whose error parts settle every other path."""
    from camlabel.schemas.tables import ERRORS

    paths = [f"/data/collection/{i // 10000:04d}/image-{i:09d}.jpg" for i in range(count)]
    pq.write_table(pa.table({"path": paths}), folder / "manifest.parquet")
    (folder / "earlier" / "errors").mkdir(parents=True)
    half = paths[::2]
    pq.write_table(pa.table({"path": half, "stage": ["decode"] * len(half), "reason": ["x"] * len(half)},
                            schema=ERRORS), folder / "earlier" / "errors" / "part-0.parquet")


def one(folder: Path) -> dict:
    from camlabel.pipeline.job import work_items
    from camlabel.schemas.config import JobConfig

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = JobConfig(source=str(folder / "manifest.parquet"), out=str(folder / "run"))
    start = time.perf_counter()
    inputs, items = work_items(config, [], folder / "run", [folder / "earlier"])
    return {"inputs": inputs, "todo": len(items), "seconds": round(time.perf_counter() - start, 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "before_mib": round(base / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"{date.today()}: peak RSS of the driver's planning step (work_items), one process per size\n")
    print("| inputs | to do | seconds | peak MiB (before planning) |")
    print("|---|---|---|---|")
    for count in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="camlabel-worklist-") as tmp:
            make(Path(tmp), count)
            r = in_fresh_process("bench.work_list", tmp)
        print(f"| {r['inputs']} | {r['todo']} | {r['seconds']} | {r['peak_mib']} ({r['before_mib']}) |", flush=True)


if __name__ == "__main__":
    main()
