"""A run's Parquet parts to COCO, streamed: a dataset pycocotools loads, or the results list COCO.loadRes expects.

Memory stays flat however large the runs: parts are read one record batch at a time (heatmaps left
out) and JSON is written as it goes, annotations spooled to a temporary file until a dataset's images
are written. With `shard_size`, every `shard_size` images start a new file and `out` becomes their index.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from itertools import chain, count, islice
from pathlib import Path

import pyarrow.parquet as pq

from ..schemas.config import ConfigError
from .store import Location, atomic_file
from .writers import (
    PARTS,
    RunError,
    atomic_write_json,
    check_parts,
    provenance,
    read_manifest,
    run_folders,
    warn_if_unfinished,
)

log = logging.getLogger(__name__)

COLUMNS = ["image_id", "path", "width", "height", "annotations"]
READ_BATCH = 256  # rows per record batch read from a part


def run_class_names(run_dir: Location) -> list[str]:
    """The class names of the model a run used, as its manifest records them."""
    return read_manifest(run_dir)["model"]["class_names"]


def expand_runs(paths: list[str | Path]) -> list[Location]:
    """A run directory stays itself; an incremental root becomes the runs of its newest series, oldest first
    (`newest_series`); a run named twice (or beside its root) counts once, so no image is exported twice. A
    path that is neither is a RunError: a mistyped run is not exported as no images."""
    runs = []
    for path in map(Location.of, paths):
        found = run_folders(path)
        if not found:
            read_manifest(path)  # a RunError unless path is a run itself
            found = [path]
        runs += newest_series(path, found)
    return list({str(run): run for run in runs}.values())


def newest_series(root: Location, runs: list[Location]) -> list[Location]:
    """The runs (oldest first) of the newest run's series. Each series annotates every image anew (another
    model, setting or camlabel's rule), so two series of one root hold the same images: merged, every image
    would be exported twice. The others are left out, with a warning naming them."""
    series = [read_manifest(run).get("series") for run in runs]
    kept = [run for run, s in zip(runs, series, strict=True) if s == series[-1]]
    if len(kept) < len(runs):
        log.warning("%s: exported the newest series %s (%d runs); left out %d runs of other series (%s): name a run "
                    "to export it", root, series[-1], len(kept), len(runs) - len(kept),
                    ", ".join(sorted({str(s) for s in series if s != series[-1]})))
    return kept


def check_outside_runs(out: Path, runs: list[Location]) -> None:
    """A ConfigError when `out` is one of the runs' own files (a manifest, a part's folder): an export
    written there would destroy the run it reads."""
    target = out.resolve()
    for run in (r for r in runs if r.local):
        root = Path(run.path).resolve()
        for own in (root / "manifest.json", root / "annotations", root / "errors"):
            if target == own or own in target.parents:
                raise ConfigError(f"out: {out} is {own}, part of the run {run}; write the export elsewhere")


def annotated_rows(run_dirs: list[Location]) -> Iterator[dict]:
    """Every annotated image of the runs, with `run`, its run's position in run_dirs: run by run, part by
    part, in path order within a part. Runs of one incremental root never hold the same image twice (a run
    skips what earlier runs annotated)."""
    for run, run_dir in enumerate(run_dirs):
        for part in (run_dir / "annotations").files(PARTS):
            file = pq.ParquetFile(part.path, filesystem=part.fs)
            for batch in file.iter_batches(batch_size=READ_BATCH, columns=COLUMNS):
                yield from ({**row, "run": run} for row in batch.to_pylist())


def coco_records(rows: Iterator[dict], image_ids: Iterator[int], annotation_ids: Iterator[int],
                 image_root: str | None = None, min_score: float = 0.0) -> Iterator[tuple[dict, list[dict]]]:
    """Rows -> (COCO image, its COCO annotations scoring at least min_score), numbered from the two counters.
    Every image is kept, with no annotation when none scores enough: to a detector it is then background.
    A path below image_root (a folder or a URI) is named relative to it, as COCO names images below its image
    folder; any other keeps its whole path, which a trainer's join with its image root leaves as it is."""
    below = image_root.rstrip("/") + "/" if image_root else None
    for row in rows:
        image_id = next(image_ids)
        name = row["path"].removeprefix(below) if below else row["path"]
        image = {"id": image_id, "file_name": name, "width": row["width"], "height": row["height"],
                 "camlabel_id": row["image_id"], "camlabel_run": row["run"]}
        yield image, [{
            "id": next(annotation_ids), "image_id": image_id, "category_id": ann["category_id"],
            "bbox": [round(v, 2) for v in ann["bbox"]], "score": round(ann["score"], 5), "area": ann["area"],
            "iscrowd": 0, "segmentation": {"size": [row["height"], row["width"]], "counts": ann["rle_counts"]},
            **({"runner_ups": [{"category_id": r["category_id"], "score": round(r["score"], 5)}
                               for r in ann["runner_ups"]]} if ann.get("runner_ups") else {}),
        } for ann in row["annotations"] if ann["score"] >= min_score]


class JsonList:
    """The elements of one JSON list, written to a file as they come (the brackets are the caller's)."""

    def __init__(self, f) -> None:
        self.f, self.count = f, 0

    def add(self, item: dict) -> None:
        self.f.write(("," if self.count else "") + "\n" + json.dumps(item, separators=(",", ":")))
        self.count += 1


def write_dataset(path: Path, records: Iterator[tuple[dict, list[dict]]], header: dict) -> dict:
    """One COCO dataset file: images written as they come, annotations spooled and appended after."""
    with atomic_file(path, "w") as out, tempfile.TemporaryFile("w+", dir=path.parent) as spool:
        images, annotations = JsonList(out), JsonList(spool)
        out.write(json.dumps(header)[:-1] + ', "images": [')
        for image, anns in records:
            images.add(image)
            for ann in anns:
                annotations.add(ann)
        out.write('\n], "annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, out)
        out.write("\n]}\n")
    return {"file": path.name, "images": images.count, "annotations": annotations.count}


def export_coco(run_dirs: list[str | Path], out: Path, results: bool = False, image_root: str | None = None,
                shard_size: int | None = None, min_score: float = 0.0) -> dict:
    """Write the runs as one COCO dataset (or the results list with `results`), or as shards of
    `shard_size` images each beside `out`, which then indexes them. Image ids run 1.. across shards.
    min_score: boxes scoring less are left out (where to cut: `camlabel eval`'s or `calibrate`'s precision by
    score on labelled images)."""
    runs, out = expand_runs(run_dirs), Path(out)
    check_outside_runs(out, runs)
    for run in runs:
        check_parts(run)
        warn_if_unfinished(run, read_manifest(run))
    names = run_class_names(runs[0]) if runs else []
    other = next((run for run in runs[1:] if run_class_names(run) != names), None)
    if other is not None:  # one category list: another model's classes would take this one's ids
        raise RunError(f"{other} was made by a model with other classes than {runs[0]}; export them apart")
    records = coco_records(annotated_rows(runs), count(1), count(1), image_root, min_score)
    if results:
        keys = ("image_id", "category_id", "bbox", "score", "segmentation")
        with atomic_file(out, "w") as f:
            f.write("[")
            listed = JsonList(f)
            for _image, anns in records:
                for ann in anns:
                    listed.add({k: ann[k] for k in keys})
            f.write("\n]\n")
        return {"out": str(out), "annotations": listed.count}
    header = {"info": {"description": "camlabel pseudo labels", **({"image_root": image_root} if image_root else {}),
                       "runs": [{"dir": str(r), **provenance(read_manifest(r))} for r in runs]},  # by `camlabel_run`
              "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)]}
    if not shard_size:
        return {"out": str(out), **write_dataset(out, records, header)}
    shards = []
    for first in records:  # each turn takes one record, then up to shard_size - 1 more
        path = out.with_name(f"{out.stem}-{len(shards):05d}{out.suffix or '.json'}")
        shards.append(write_dataset(path, chain([first], islice(records, shard_size - 1)), header))
    index = {**header, "shards": shards, "images": sum(s["images"] for s in shards),
             "annotations": sum(s["annotations"] for s in shards)}
    atomic_write_json(out, index)
    return {"out": str(out), **{k: index[k] for k in ("images", "annotations", "shards")}}
