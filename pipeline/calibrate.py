"""`camlabel calibrate`: choose the box and mask thresholds on a small set with ground truth.

Maps are computed and refined once per image; only the cheap last step (threshold, components, masks)
is repeated for each candidate, and each candidate is scored with the same evaluator as `camlabel
eval`. The box threshold maximises (CorLoc + box AP50) / 2; then, at that threshold, the mask threshold
maximises (mean mask IoU + segm AP50) / 2 (a ground truth of boxes alone keeps the box threshold, at which the
boxes, each its mask's, were scored). The result is a YAML file `annotate --config` takes.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path

import yaml
from pycocotools.coco import COCO
from tqdm import tqdm

from ..schemas.config import AnnotateSettings, JobConfig
from ..workers.annotator import Annotator
from ..workers.decode import DecodeError, decode, read_bytes
from ..workers.models import LoadedModel
from .evaluate import EvaluationError, by_tail, category_mapping, evaluate, find_by_tail, load_ground_truth
from .sources import list_images

log = logging.getLogger(__name__)

THRESHOLDS = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.3 .. 0.8 of the map's max


def ground_truth_classes(gt: COCO, class_names: list[str]) -> dict[int, int]:
    """GT category id -> model class index, matched as eval matches (camlabel numbers class i as id i + 1)."""
    classes = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    mapping = category_mapping(gt.dataset["categories"], classes)
    unknown = [c["name"] for c in gt.dataset["categories"] if c["id"] not in mapping]
    if unknown:
        raise EvaluationError(f"ground-truth category {unknown[0]!r} is not one of the model's classes")
    return {gt_id: class_id - 1 for gt_id, class_id in mapping.items()}


class CalibrationSet:
    """The images under `images` that the ground truth has, with their refined maps computed once;
    `score` turns them into labels at any thresholds and scores those like `camlabel eval`.

    use_labels: map the classes the ground truth says are present (the weakly supervised setting);
    otherwise the top predicted classes, as `annotate` does without --labels.
    """

    def __init__(self, images: str | list[str], gt_path: Path, loaded: LoadedModel, settings: AnnotateSettings,
                 use_labels: bool = True, batch_size: int = 8, progress: bool = True) -> None:
        full = load_ground_truth(gt_path)
        to_class = ground_truth_classes(full, loaded.class_names)
        self.to_category = {i: c for c, i in to_class.items()}
        paths = images if isinstance(images, list) else list_images(images)
        index = by_tail((p, p) for p in paths)  # matched as eval matches: a.jpg of two folders is no guess
        wanted = [(im, path) for im in full.dataset["images"]
                  if (path := find_by_tail(im["file_name"], index)) is not None]
        if not wanted:
            raise EvaluationError("none of the ground truth's images is among the images given")
        self.annotator = Annotator(loaded, settings)
        self.groups = []  # (image ids of the group, its WorkingMaps)
        for start in tqdm(range(0, len(wanted), batch_size), desc="maps", unit="batch", disable=not progress):
            chunk, pictures = [], []
            for im, path in wanted[start : start + batch_size]:
                try:
                    pictures.append(decode(read_bytes(path)))
                    chunk.append(im)
                except (OSError, DecodeError) as exc:
                    log.warning("skipping %s: %s", im["file_name"], exc)
            if not chunk:
                continue
            labels = [sorted({to_class[a["category_id"]] for a in full.imgToAnns[im["id"]]}) for im in chunk]
            for group in self.annotator.work(pictures, labels if use_labels else None):
                self.groups.append(([chunk[i]["id"] for i in group.members], group))
        self.gt = load_ground_truth(gt_path, {i for ids, _ in self.groups for i in ids})

    def __len__(self) -> int:
        return len(self.gt.getImgIds())

    def score(self, threshold: float, mask_threshold: float) -> dict:
        rule = replace(self.annotator.rule, threshold=threshold, mask_threshold=mask_threshold)
        preds = []
        for ids, group in self.groups:  # classes the ground truth does not have cannot be scored
            for image_id, found in zip(ids, group.labels(rule), strict=True):
                preds += [{"image_id": image_id, "category_id": self.to_category[p.class_index], "bbox": p.bbox,
                           "score": p.score, "segmentation": p.rle} for p in found if p.class_index in self.to_category]
        return evaluate(self.gt, preds)


def calibrate(images: str | list[str], gt_path: Path, loaded: LoadedModel, settings: AnnotateSettings,
              use_labels: bool = True, thresholds: tuple[float, ...] = THRESHOLDS, progress: bool = True) -> dict:
    """Score every candidate threshold; choose the box threshold, then the mask threshold (see above)."""
    found = CalibrationSet(images, gt_path, loaded, settings, use_labels, progress=progress)
    boxes = {t: found.score(t, t) for t in tqdm(thresholds, desc="box thresholds", disable=not progress)}
    best = max(thresholds, key=lambda t: (boxes[t]["corloc"] + boxes[t]["bbox_AP50"]) / 2)
    if boxes[best]["mean_mask_iou"] is None:  # ground truth of boxes alone: the masks as the boxes were scored
        masks, best_mask = {}, best
    else:
        masks = {m: (boxes[m] if m == best else found.score(best, m))
                 for m in tqdm(thresholds, desc="mask thresholds", disable=not progress)}
        best_mask = max(thresholds, key=lambda m: (masks[m]["mean_mask_iou"] + masks[m].get("segm_AP50", 0)) / 2)
    keys = ("corloc", "bbox_AP50", "bbox_AP", "mean_mask_iou", "segm_AP50")
    return {
        "images": len(found),
        "threshold": best,
        "mask_threshold": best_mask,
        "box_thresholds": {t: {k: round(r[k], 4) for k in keys if r.get(k) is not None} for t, r in boxes.items()},
        "mask_thresholds": {m: {k: round(r[k], 4) for k in keys if r.get(k) is not None} for m, r in masks.items()},
        # what each score is worth on these images at the chosen threshold: where to cut a run's boxes
        "precision_by_score": boxes[best]["bbox_precision_by_score"],
    }


def calibrated_config(config: JobConfig, result: dict) -> str:
    """The YAML `annotate --config` takes: the model and settings used here, with the chosen thresholds."""
    keep = ("model", "weights", "class_names", "model_dir", "target_layer", *(f.name for f in fields(AnnotateSettings)))
    values = {k: getattr(config, k) for k in keep if getattr(config, k) is not None}
    values |= {"threshold": result["threshold"], "mask_threshold": result["mask_threshold"]}
    return yaml.safe_dump(values, sort_keys=False)
