"""export-coco's memory: a run of N annotated images exported whole and in shards, side by side for two sizes.

    python -m bench.export [--sizes 100000,1000000] [--per-part 1000]

The run is written straight as parts (no model): every image a copy of one real row (three boxes with
their RLE masks of a 640x480 image) under its own path and id, in parts of --per-part rows, as the
actors write them (pipeline.writers.write_part). Each export runs as its own `camlabel export-coco`
process; its own peak RSS (ru_maxrss, from wait4) is what the table reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
from camlabel.pipeline.writers import write_part
from camlabel.schemas.tables import RESULTS
from pycocotools import mask as mask_utils

from bench import in_fresh_process

HEIGHT, WIDTH = 480, 640


def template_row() -> dict:
    """One annotated image: three instances with masks of different shapes."""
    annotations = []
    for k, (y, x, h, w) in enumerate([(40, 60, 200, 300), (250, 300, 180, 250), (100, 400, 90, 120)]):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8, order="F")
        yy, xx = np.ogrid[:HEIGHT, :WIDTH]
        mask[((yy - y - h / 2) / (h / 2)) ** 2 + ((xx - x - w / 2) / (w / 2)) ** 2 <= 1] = 1
        rle = mask_utils.encode(mask)
        annotations.append({"category_id": 10 + k, "class_name": f"class {k}", "bbox": [x, y, w, h],
                            "score": 0.5 / (k + 1), "area": int(mask.sum()), "rle_counts": rle["counts"].decode()})
    return {"image_id": "", "path": "", "width": WIDTH, "height": HEIGHT, "label_source": "labels",
            "top_classes": [10, 11, 12, 13, 14], "top_scores": [0.5, 0.2, 0.1, 0.05, 0.01],
            "annotations": annotations, "heatmaps": [], "method": "cam", "precision": "float32", "device": "cpu",
            "error_stage": None, "error": None}


def write_run(run_dir: Path, count: int, per_part: int) -> None:
    (run_dir / "annotations").mkdir(parents=True)
    names = [f"class {i}" for i in range(1000)]
    (run_dir / "manifest.json").write_text(json.dumps({"source": "/data", "model": {"class_names": names}}))
    row = pa.Table.from_pylist([template_row()], schema=RESULTS)
    for start in range(0, count, per_part):
        n = min(per_part, count - start)
        part = row.take(pa.array(np.zeros(n, np.int64)))
        numbers = range(start, start + n)
        part = part.set_column(0, "image_id", pa.array([f"{i:064x}" for i in numbers], pa.string()))
        part = part.set_column(1, "path", pa.array([f"/data/{i // 10000:04d}/{i:09d}.jpg" for i in numbers]))
        write_part(run_dir, part)


def written(folder: Path, name: str) -> int:
    return round(sum(p.stat().st_size for p in folder.glob(f"{name}*.json")) / 2**20)


def measure(count: int, per_part: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="camlabel-export-") as tmp:
        run_dir = Path(tmp) / "run"
        write_run(run_dir, count, per_part)
        result = {"images": count}
        for name, extra in (("whole", []), ("shards", ["--shard-size", "100000"])):
            start = time.perf_counter()
            with tempfile.TemporaryFile("w+") as stdout:
                child = subprocess.Popen([sys.executable, "-m", "camlabel.pipeline.cli", "export-coco", str(run_dir),
                                          "--out", str(Path(tmp) / f"{name}.json"), *extra], stdout=stdout)
                _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest so far
                assert os.waitstatus_to_exitcode(status) == 0, status
                stdout.seek(0)
                summary = json.loads(stdout.read().strip().splitlines()[-1])
            assert summary["images"] == count and summary["annotations"] == 3 * count, summary
            result[name] = {"peak_mib": round(usage.ru_maxrss / 1024),
                            "seconds": round(time.perf_counter() - start),
                            "mib_written": written(Path(tmp), name)}
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--per-part", type=int, default=1000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a fresh process per size: its children's peak is that size's alone
        print(json.dumps(measure(args.one, args.per_part)))
        return
    print(f"{date.today()}: `camlabel export-coco` peak RSS (ru_maxrss), one COCO file and shards of 100,000\n")
    print("| images | whole: peak MiB / seconds / MiB written | shards: peak MiB / seconds / MiB written |")
    print("|---|---|---|")
    for count in (int(s) for s in args.sizes.split(",")):
        r = in_fresh_process("bench.export", str(count), "--per-part", str(args.per_part))
        cells = [f"{r[k]['peak_mib']} / {r[k]['seconds']} / {r[k]['mib_written']}" for k in ("whole", "shards")]
        print(f"| {count} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
