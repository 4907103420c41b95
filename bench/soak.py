"""Soak: annotate N images (a small real set repeated under different names) and report the driver's
peak memory, side by side for two sizes, and that every image is accounted for.

    python -m bench.soak [--sizes 1000,20000] [--input-size 64] [--unreadable [--series]]

The images are stamps-public photos shrunk to 96 px (or scikit-image's photos when that set is
absent) with one distinguishing byte appended, so every file has its own content hash. The model runs
at a small input size: this measures the driver's streaming, not the model. With --unreadable the
source is a Parquet manifest of N paths that do not exist: every image becomes a read error, so the whole
data plane (planning, streaming, parts, counting) runs at sizes the model could not reach on 2 cores.
With --series as well, the job a scheduled run does: image-level labels for every path, an incremental
run, a second one that plans against the first (which retries every read error), then export-coco of
both; the peak is the largest driver's of the three commands.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image

from bench import in_fresh_process

SHARED = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/stamps-public/images"


def make_collection(folder: Path, count: int) -> None:
    if SHARED.is_dir():
        seeds = [Image.open(p).convert("RGB") for p in sorted(SHARED.glob("*.jpg"))[:50]]
    else:
        from skimage import data

        seeds = [Image.fromarray(f()) for f in (data.chelsea, data.coffee, data.astronaut, data.rocket)]
    blobs = []
    for seed in seeds:
        seed = seed.copy()
        seed.thumbnail((96, 96))
        path = folder / "seed.jpg"
        seed.save(path, quality=85)
        blobs.append(path.read_bytes())
    path.unlink()
    for i in range(count):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"img{i:06d}.jpg").write_bytes(blobs[i % len(blobs)] + i.to_bytes(4, "big"))


def camlabel(*args: str) -> dict:
    """One camlabel command in its own process; its summary line."""
    done = subprocess.run([sys.executable, "-m", "camlabel.pipeline.cli", *args], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(count: int, input_size: int, unreadable: bool = False, series: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="camlabel-soak-") as tmp:
        source, out = Path(tmp) / "src", Path(tmp) / "out"
        source.mkdir()
        annotate = ["annotate", "--out", str(out), "--input-size", str(input_size), "--scales", "1.0", "--no-flip",
                    "--batch-size", "64"]
        if unreadable:
            names = [f"{i:09d}.jpg" for i in range(count)]
            paths = [f"missing/{i // 10000:04d}/{name}" for i, name in enumerate(names)]
            pq.write_table(pa.table({"path": paths}), source / "manifest.parquet")
            source = source / "manifest.parquet"
        else:
            make_collection(source, count)
        if series:
            labels = Path(tmp) / "labels.csv"
            pacsv.write_csv(pa.table({"file_name": names, "labels": [str(i % 1000) for i in range(count)]}), labels)
            annotate += ["--labels", str(labels), "--incremental"]
        start = time.perf_counter()
        summary = camlabel(annotate[0], str(source), *annotate[1:])
        seconds = [time.perf_counter() - start]
        if series:
            again = camlabel(annotate[0], str(source), *annotate[1:])
            seconds.append(time.perf_counter() - start - sum(seconds))
            exported = camlabel("export-coco", str(out), "--out", str(Path(tmp) / "coco.json"), "--shard-size", "10000")
            seconds.append(time.perf_counter() - start - sum(seconds))
            assert again["inputs"] == count and exported["images"] == summary["annotated"], (again, exported)
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest of this process's children
        return {"images": count, **{k: summary[k] for k in ("annotated", "errors", "inputs")},
                "accounted": summary["annotated"] + summary["errors"] == count,
                "driver_peak_mib": round(peak_kib / 1024), "seconds": " + ".join(f"{s:.0f}" for s in seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--unreadable", action="store_true", help="a manifest of paths that do not exist")
    parser.add_argument("--series", action="store_true", help="with --unreadable: labels, a second incremental "
                        "run, export-coco")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.series and not args.unreadable:
        parser.error("--series needs --unreadable")
    if args.one:  # a fresh process per size, so its children's peak is that driver's alone
        print(json.dumps(run(args.one, args.input_size, args.unreadable, args.series)))
        return
    print(f"{date.today()}: driver peak RSS (ru_maxrss of the largest camlabel process of each size)\n")
    print("| images | annotated | errors | all accounted for | driver peak MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for count in (int(s) for s in args.sizes.split(",")):
        r = in_fresh_process("bench.soak", str(count), "--input-size", str(args.input_size),
                             *(["--unreadable"] if args.unreadable else []), *(["--series"] if args.series else []))
        print(f"| {r['images']} | {r['annotated']} | {r['errors']} | {r['accounted']} | {r['driver_peak_mib']} | "
              f"{r['seconds']} |", flush=True)


if __name__ == "__main__":
    main()
