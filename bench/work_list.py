"""The driver's memory for planning a run: listing a Parquet manifest and leaving out what is settled.

    python -m bench.work_list [--sizes 100000,1000000] [--labels] [--worker]

For N paths in a Parquet manifest, half of them settled by an earlier run's parts (error rows, which
settle an image as annotation rows do), each size in a fresh process with a private local Ray: the
driver's peak RSS after `pipeline.job.planned` had a Ray task write the work list, the same after the
plan that reads it was cut into blocks. The listing, the anti-join and the labels take their memory in
the worker that runs the planning task (about 0.4 KB an input, as they took in the driver before). No
model runs. Issue 15's goal: the
driver's peak for 1M within 1.2x of 100k. --labels: a labels CSV names a class for every path (the
planning task joins it). --worker: the planning itself (`pipeline.worklist.plan_work`) in the measured
process, no Ray: what the planning task's worker holds.
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
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bench import add_step_flags, in_fresh_process, make_in_fresh_process


def make(folder: Path, count: int) -> None:
    """The manifest, and an earlier run whose error parts settle every other path."""
    from camlabel.schemas.tables import ERRORS

    paths = [f"/data/collection/{i // 10000:04d}/image-{i:09d}.jpg" for i in range(count)]
    pq.write_table(pa.table({"path": paths}), folder / "manifest.parquet")
    pacsv.write_csv(pa.table({"file_name": [p.rsplit("/", 1)[1] for p in paths],
                              "labels": [str(i % 1000) for i in range(count)]}), folder / "labels.csv")
    (folder / "earlier" / "errors").mkdir(parents=True)
    half = paths[::2]
    pq.write_table(pa.table({"path": half, "stage": ["decode"] * len(half), "reason": ["x"] * len(half)},
                            schema=ERRORS), folder / "earlier" / "errors" / "part-0.parquet")


def one(folder: Path, labels: bool, worker: bool) -> dict:
    from camlabel.pipeline.job import connect, planned
    from camlabel.pipeline.plan import MAX_BLOCKS, WorkList
    from camlabel.pipeline.worklist import WORK_LIST, plan_work
    from camlabel.schemas.config import JobConfig

    if not worker:
        connect(None)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    config = JobConfig(source=str(folder / "manifest.parquet"), out=str(folder / "run"),
                       labels=str(folder / "labels.csv") if labels else None)
    start = time.perf_counter()
    (folder / "run").mkdir()
    plan = plan_work if worker else planned
    inputs, todo, *_ = plan(config, [str(i) for i in range(1000)], folder / "run", [folder / "earlier"])
    seconds = time.perf_counter() - start
    planned_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    blocks = WorkList(folder / "run" / WORK_LIST, todo, max(8, -(-todo // MAX_BLOCKS))).get_read_tasks(1)

    return {"inputs": inputs, "todo": todo, "seconds": round(seconds, 1), "blocks": len(blocks),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "planned_mib": round(planned_peak / 1024), "before_mib": round(base / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--labels", action="store_true", help="a labels CSV for every path")
    parser.add_argument("--worker", action="store_true", help="measure the planning itself, without Ray")
    add_step_flags(parser)
    args = parser.parse_args()
    flags = [*(["--labels"] if args.labels else []), *(["--worker"] if args.worker else [])]
    if args.one:
        print(json.dumps(one(args.one, args.labels, args.worker)))
        return
    if args.make:
        make(args.make, args.count)
        return
    who = "the planning itself, in-process" if args.worker else "the driver while a Ray task plans the run"
    print(f"{date.today()}: peak RSS of {who}, one process per size{', labels for every path' * args.labels}\n")
    print("| inputs | to do | seconds | driver MiB before / planned / blocks cut | blocks |")
    print("|---|---|---|---|---|")
    for count in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="camlabel-worklist-") as tmp:
            make_in_fresh_process("bench.work_list", tmp, count)
            r = in_fresh_process("bench.work_list", tmp, *flags)
        print(f"| {r['inputs']} | {r['todo']} | {r['seconds']} | {r['before_mib']} / {r['planned_mib']} / "
              f"{r['peak_mib']} | {r['blocks']} |", flush=True)


if __name__ == "__main__":
    main()
