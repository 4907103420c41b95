"""A run's Parquet parts to COCO: a dataset pycocotools loads, or the results list COCO.loadRes expects."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..schemas.tables import IMAGES
from .writers import atomic_write_json, read_parts


def run_class_names(run_dir: Path) -> list[str]:
    """The class names of the model a run used, as its manifest records them."""
    return json.loads((Path(run_dir) / "manifest.json").read_text())["model"]["class_names"]


def coco_from_runs(run_dirs: list[Path], class_names: list[str] | None = None, results: bool = False):
    """Stream the parts of one or more runs into COCO. Images are numbered 1.. in path order; an image
    present in several runs (same content hash) is taken once, from the first run that has it."""
    images, annotations, seen = [], [], set()
    for run_dir in run_dirs:
        folder = Path(run_dir) / "annotations"
        if not folder.is_dir():
            continue
        rows = read_parts(folder, IMAGES).sort_by("path").to_pylist()
        for row in rows:
            if row["image_id"] in seen:
                continue
            seen.add(row["image_id"])
            image_id = len(images) + 1
            images.append({"id": image_id, "file_name": row["path"], "width": row["width"],
                           "height": row["height"], "camlabel_id": row["image_id"]})
            for ann in row["annotations"]:
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": ann["category_id"],
                    "bbox": [round(v, 2) for v in ann["bbox"]], "score": round(ann["score"], 5),
                    "area": ann["area"], "iscrowd": 0,
                    "segmentation": {"size": [row["height"], row["width"]], "counts": ann["rle_counts"]},
                })
    if results:
        return [{k: a[k] for k in ("image_id", "category_id", "bbox", "score", "segmentation")} for a in annotations]
    names = class_names or (run_class_names(run_dirs[0]) if run_dirs else [])
    return {
        "info": {"description": "camlabel pseudo labels", "runs": [str(r) for r in run_dirs]},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(names)],
    }


def expand_runs(paths: list[Path]) -> list[Path]:
    """A run directory stays itself; an incremental root becomes its finished runs, oldest first."""
    runs = []
    for path in paths:
        nested = sorted(p.parent for p in Path(path).glob("runs/*/manifest.json"))
        runs += nested if nested else [Path(path)]
    return runs


def export_coco(run_dirs: list[Path], out: Path, results: bool = False, relative_to: str | None = None) -> dict:
    coco = coco_from_runs(expand_runs(run_dirs), results=results)
    if relative_to and not results:
        for image in coco["images"]:
            image["file_name"] = os.path.relpath(image["file_name"], relative_to)
    atomic_write_json(Path(out), coco)
    return coco
