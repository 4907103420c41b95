"""An annotate actor's memory for the contents earlier runs annotated (incremental runs name duplicates).

    python -m bench.contents [--sizes 100000,1000000]

For N images annotated by earlier runs of a series, each step in a process of its own: what an actor
held before this index existed (the earlier runs' image_id and path as one Arrow table), the planning
task's index (`pipeline.worklist` sorts the hashes and paths: seconds and peak RSS), and what an actor
holds once it has mapped that index and looked up a part of 256 images, half of them seen before (RSS
growth: the pages it touched).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa

from bench import add_step_flags, in_fresh_process, make_in_fresh_process

PART_ROWS = 100_000
LOOKUPS = 256


def image_id(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def make(folder: Path, count: int) -> None:
    """An earlier run whose parts hold `count` annotated images (no annotations: only ids and paths count)."""
    from camlabel.pipeline.writers import write_part
    from camlabel.schemas.tables import RESULTS

    for start in range(0, count, PART_ROWS):
        rows = range(start, min(count, start + PART_ROWS))
        columns = {field.name: pa.nulls(len(rows), field.type) for field in RESULTS}
        columns.update(path=pa.array([f"/data/collection/{i // 10000:04d}/image-{i:09d}.jpg" for i in rows]),
                       image_id=pa.array([image_id(i) for i in rows]), width=pa.array([1] * len(rows), pa.int32()),
                       height=pa.array([1] * len(rows), pa.int32()),
                       annotations=pa.array([[] for _ in rows], RESULTS.field("annotations").type))
        write_part(folder / "earlier", pa.table(columns).cast(RESULTS))
    (folder / "source").mkdir()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one(folder: Path, step: str, count: int) -> dict:
    from camlabel.pipeline.contents import EarlierContents
    from camlabel.pipeline.store import Location
    from camlabel.pipeline.worklist import plan_work
    from camlabel.pipeline.writers import read_parts
    from camlabel.schemas.config import JobConfig
    from camlabel.schemas.tables import IMAGES

    base, start = rss_mib(), time.perf_counter()
    if step == "table":
        held = read_parts(folder / "earlier" / "annotations", IMAGES, ["image_id", "path"])
        return {"mib": round(rss_mib() - base), "rows": held.num_rows}
    if step == "plan":
        config = JobConfig(source=str(folder / "source"), out=str(folder / "run"))
        plan_work(config, ["c"], folder / "run", [Location.of(folder / "earlier")])
        return {"seconds": round(time.perf_counter() - start, 1),
                "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    contents = EarlierContents(Location.of(folder / "run"))
    chosen = random.Random(0).sample(range(count), LOOKUPS // 2)
    ids = [image_id(i) for i in chosen] + [image_id(count + i) for i in range(LOOKUPS // 2)]
    found = contents.earlier_paths(ids)
    assert sum(p is not None for p in found) == LOOKUPS // 2
    return {"mib": round(rss_mib() - base, 1), "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    add_step_flags(parser)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.step, args.count)))
        return
    if args.make:
        make(args.make, args.count)
        return
    print(f"{date.today()}: an actor's memory for the earlier runs' contents, one process per step\n")
    print("| earlier images | actor before: Arrow table MiB | planning the index: s / peak MiB | "
          f"actor now: index mapped, {LOOKUPS} looked up: MiB / s |")
    print("|---|---|---|---|")
    for count in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="camlabel-contents-") as tmp:
            make_in_fresh_process("bench.contents", tmp, count)
            steps = {step: in_fresh_process("bench.contents", tmp, "--step", step, "--count", str(count))
                     for step in ("table", "plan", "actor")}
        print(f"| {count} | {steps['table']['mib']} | {steps['plan']['seconds']} / {steps['plan']['peak_mib']} | "
              f"{steps['actor']['mib']} / {steps['actor']['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
