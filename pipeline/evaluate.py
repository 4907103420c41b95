"""Score pseudo labels against COCO ground truth: CorLoc, mean box / mask IoU, COCO AP (pycocotools).

CorLoc and the IoUs are accumulated one image at a time (`LocalisationMeter`), so their memory does
not grow with the dataset; COCO AP is pycocotools' COCOeval, as everyone computes it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import reprlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ..schemas.config import UserError

T = TypeVar("T")


class EvaluationError(UserError):
    """Predictions that cannot be scored; the message says which."""


class LocalisationMeter:
    """accumulate(gt_anns, pred_anns) per image, then compute().

    For every ground-truth object, the top-scoring prediction of its class on its image is compared with
    it: CorLoc is the share with box IoU >= 0.5; box and mask IoU are averaged (0 when no prediction).
    CorLoc is also given by object size (its box's share of the image), where CAM's failures differ:
    large objects tend to be boxed by their most telling part, small ones together with their surroundings.
    And by company: an object alone in its image, or sharing it with others, which may cover part of it
    and whose maps compete with its own (most misses on both public sets, bench/README.md). Crowd regions
    (`iscrowd: 1`) are not objects and are skipped. Boxes per object counts, for each object, the
    predicted boxes of its class that overlap it (IoU >= 0.1) or lie inside it: 1 is one box per object;
    more means its parts were boxed as objects of their own.
    """

    SIZES = ((0.0, "<3%"), (0.03, "3-8%"), (0.08, "8-20%"), (0.2, ">=20%"))

    def __init__(self) -> None:
        self.objects = 0
        self.hits = 0
        self.by_size = {name: [0, 0] for _, name in self.SIZES}  # [hits, objects]
        self.by_company = {"alone": [0, 0], "with others": [0, 0]}
        self.box_iou = 0.0
        self.mask_iou = 0.0
        self.boxes_on_objects = 0

    def accumulate(self, gt: list[dict], preds: list[dict], height: int, width: int) -> None:
        best: dict[int, dict] = {}
        for p in preds:
            if p["category_id"] not in best or p["score"] > best[p["category_id"]]["score"]:
                best[p["category_id"]] = p
        objects = [g for g in gt if not g.get("iscrowd", 0)]
        company = self.by_company["alone" if len(objects) == 1 else "with others"]
        for g in objects:
            self.objects += 1
            company[1] += 1
            mine = [p["bbox"] for p in preds if p["category_id"] == g["category_id"]]
            self.boxes_on_objects += _boxes_on(g["bbox"], mine)
            share = g["bbox"][2] * g["bbox"][3] / max(height * width, 1)
            size = self.by_size[[name for low, name in self.SIZES if share >= low][-1]]
            size[1] += 1
            p = best.get(g["category_id"])
            if p is None:
                continue
            biou = float(mask_utils.iou([p["bbox"]], [g["bbox"]], [0])[0, 0])
            self.box_iou += biou
            self.hits += biou >= 0.5
            size[0] += biou >= 0.5
            company[0] += biou >= 0.5
            if "segmentation" in p and "segmentation" in g:
                gseg = _rle(g["segmentation"], height, width)
                self.mask_iou += float(mask_utils.iou([_rle(p["segmentation"], height, width)], [gseg], [0])[0, 0])

    def compute(self) -> dict[str, float]:
        n = max(self.objects, 1)
        return {"objects": self.objects, "corloc": self.hits / n, "mean_box_iou": self.box_iou / n,
                "mean_mask_iou": self.mask_iou / n, "boxes_per_object": self.boxes_on_objects / n,
                "corloc_by_size": _by_bin(self.by_size), "corloc_by_company": _by_bin(self.by_company)}


def _by_bin(counts: dict[str, list[int]]) -> dict[str, dict]:
    """Each bin's [hits, objects] as its objects and CorLoc (None for a bin with no object: not a measured 0)."""
    return {name: {"objects": k, "corloc": hits / k if k else None} for name, (hits, k) in counts.items()}


def _boxes_on(obj: list[float], boxes: list[list[float]]) -> int:
    """How many of `boxes` (COCO x, y, w, h) overlap the object's box with IoU >= 0.1 or lie inside it."""
    if not boxes:
        return 0
    iou = mask_utils.iou(boxes, [obj], [0])[:, 0]
    x, y, w, h = obj
    inside = [bx >= x - 1 and by >= y - 1 and bx + bw <= x + w + 1 and by + bh <= y + h + 1 for bx, by, bw, bh in boxes]
    return int(sum(i >= 0.1 or c for i, c in zip(iou, inside, strict=True)))


def _rle(segmentation, height: int, width: int) -> dict:
    if isinstance(segmentation, list):  # polygons
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def read_json(path: str | Path, what: str):
    """A JSON file, or an EvaluationError naming it: missing, binary, not JSON, or nested past Python's recursion
    limit (`[[[...]]]`: a RecursionError inside the parser)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EvaluationError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None


def load_predictions(pred: str | Path | list | dict) -> list[dict]:
    """A COCO results list, or a COCO dataset dict (its annotations), from a path or in memory."""
    if isinstance(pred, (str, Path)):
        pred = read_json(pred, "predictions")
    if isinstance(pred, dict) and "annotations" not in pred:
        raise EvaluationError("predictions must be a COCO results list or a COCO dataset (this has no annotations)")
    anns = pred["annotations"] if isinstance(pred, dict) else pred
    if not isinstance(anns, list):
        raise EvaluationError("predictions must be a COCO results list or a COCO dataset")
    for n, a in enumerate(anns):
        _check_prediction(n, a)
    return anns


def _check_prediction(n: int, a) -> None:
    """An EvaluationError naming prediction n unless pycocotools can score it (a malformed one raised inside
    pycocotools, as a traceback, or was scored as something else)."""
    def fail(what: str) -> None:
        raise EvaluationError(f"prediction {n}: {what}")

    if not isinstance(a, dict):
        fail(f"{reprlib.repr(a)} is not an object")
    missing = {"image_id", "category_id", "bbox", "score"} - set(a)
    if missing:
        fail(f"lacks {', '.join(sorted(missing))}")
    for key in ("image_id", "category_id"):
        if not isinstance(a[key], int) or isinstance(a[key], bool):
            fail(f"{key} {reprlib.repr(a[key])} is not an integer")
    box = a["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(map(_finite, box))):
        fail(f"bbox {reprlib.repr(box)} is not four numbers [x, y, w, h]")
    if box[2] < 0 or box[3] < 0:  # corners (x1, y1, x2, y2) taken for [x, y, w, h] often give these
        fail(f"bbox {reprlib.repr(box)} has a negative width or height: [x, y, w, h] expected")
    if not _finite(a["score"]):
        fail(f"score {reprlib.repr(a['score'])} is not a number")
    seg = a.get("segmentation")
    rle = isinstance(seg, dict) and {"size", "counts"} <= set(seg)
    if seg is not None and not (rle or isinstance(seg, list) and all(isinstance(p, list) for p in seg)):
        fail(f"segmentation {reprlib.repr(seg)} is neither an RLE (size, counts) nor polygons")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _match_images(gt: COCO, images: list[dict], anns: list[dict]) -> list[dict]:
    """A predicted COCO dataset numbers its own images: match them to the ground truth by path (`by_tail`)."""
    ground = by_tail((i["file_name"], i["id"]) for i in gt.dataset["images"])
    mapping = {i["id"]: find_by_tail(i["file_name"], ground) for i in images}
    missing = [i["file_name"] for i in images if mapping[i["id"]] is None]
    if missing:
        raise EvaluationError(f"{len(missing)} predicted images are not in the ground truth, e.g. {missing[:3]}")
    return [{**a, "image_id": mapping[a["image_id"]]} for a in anns]


def _name_key(name: str) -> str:
    return name.lower().replace(" ", "_")


def _unique_keys(categories: list[dict]) -> dict[str, int]:
    """Each name key (`_name_key`) that one category alone has -> its id."""
    counts = Counter(_name_key(c.get("name", "")) for c in categories)
    return {key: c["id"] for c in categories if counts[key := _name_key(c.get("name", ""))] == 1}


def category_mapping(source: list[dict], target: list[dict]) -> dict[int, int]:
    """COCO categories of one side -> category ids of the other: by name as written, else by name with case and
    '_' for ' ' aside where one category on each side has it (ImageNet's Cardigan is a dog, its cardigan a
    sweater), else by id. Categories matching none are left out. eval and calibrate both match this way."""
    exact = {c["name"]: c["id"] for c in target if "name" in c}
    folded, own = _unique_keys(target), _unique_keys(source)
    ids = {c["id"] for c in target}
    mapping = {}
    for c in source:
        key = _name_key(c.get("name", ""))
        found = exact.get(c.get("name"), folded.get(key) if key in own else None)
        if found is None and c["id"] in ids:
            found = c["id"]
        if found is not None:
            mapping[c["id"]] = found
    return mapping


def evaluate(gt_path: str | Path | COCO, pred: str | Path | list | dict) -> dict:
    """All figures for predictions against the COCO ground truth in gt_path (or already loaded)."""
    gt = gt_path if isinstance(gt_path, COCO) else load_ground_truth(gt_path)
    if isinstance(pred, (str, Path)):
        pred = read_json(pred, "predictions")
    anns = load_predictions(pred)
    if isinstance(pred, dict) and pred.get("images"):
        anns = _match_images(gt, pred["images"], anns)
    if isinstance(pred, dict) and pred.get("categories"):  # a COCO dataset names its categories
        to_gt = category_mapping(pred["categories"], gt.dataset["categories"])
        anns = [{**a, "category_id": to_gt.get(a["category_id"], a["category_id"])} for a in anns]
    unknown = {a["image_id"] for a in anns} - set(gt.getImgIds())
    if unknown:
        raise EvaluationError(f"{len(unknown)} predicted image ids are not in {gt_path}, e.g. {sorted(unknown)[:3]}")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in anns:
        by_image[a["image_id"]].append(a)
    meter = LocalisationMeter()
    for image_id in gt.getImgIds():
        info = gt.imgs[image_id]
        meter.accumulate(gt.imgToAnns[image_id], by_image.get(image_id, []), info["height"], info["width"])
    result = {"images": len(gt.getImgIds()), "predictions": len(anns), **meter.compute()}
    result.update(_coco_ap(gt, anns, "bbox"))
    if not all("segmentation" in a for a in gt.dataset["annotations"]):  # boxes only: no mask is scored
        result["mean_mask_iou"] = None
    elif anns and all("segmentation" in a for a in anns):
        result.update(_coco_ap(gt, anns, "segm"))
    return result


def load_ground_truth(path: str | Path, image_ids: set[int] | None = None) -> COCO:
    """COCO ground truth from a file, optionally only the images in image_ids (and their objects)."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            gt = COCO(str(path))
        except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError) as exc:  # not JSON, not COCO
            raise EvaluationError(f"cannot read ground truth {path}: {type(exc).__name__}: {exc}") from None
        _check_ground_truth(path, gt.dataset)
        for a in gt.dataset.get("annotations", []):  # what COCOeval reads and boxes drawn by hand often lack
            a.setdefault("iscrowd", 0)
            a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        if image_ids is not None:
            subset = COCO()
            subset.dataset = {**gt.dataset, "images": [i for i in gt.dataset["images"] if i["id"] in image_ids],
                              "annotations": [a for a in gt.dataset["annotations"] if a["image_id"] in image_ids]}
            subset.createIndex()
            gt = subset
    return gt


def _check_ground_truth(path, dataset: dict) -> None:
    """An EvaluationError naming the first image or object the scoring cannot read (a KeyError inside it before):
    images need an integer id, width and height; objects an image_id, a category_id and a bbox of four numbers."""
    for n, image in enumerate(dataset.get("images", [])):
        if not (isinstance(image, dict) and all(isinstance(image.get(k), int) for k in ("id", "width", "height"))):
            raise EvaluationError(f"{path}: image {n} ({reprlib.repr(image)}) lacks an integer id, width or height")
    for n, a in enumerate(dataset.get("annotations", [])):
        box = a.get("bbox") if isinstance(a, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(map(_finite, box))
                and all(isinstance(a.get(k), int) for k in ("image_id", "category_id"))):
            raise EvaluationError(f"{path}: object {n} ({reprlib.repr(a)}) lacks an image_id, a category_id or a "
                                  "bbox of four numbers")


def _coco_ap(gt: COCO, anns: list[dict], iou_type: str) -> dict[str, float]:
    if not anns:
        return {f"{iou_type}_AP": 0.0, f"{iou_type}_AP50": 0.0,
                **({"bbox_precision_by_score": precision_by_score(None)} if iou_type == "bbox" else {})}
    anns = [{k: v for k, v in a.items() if k != "id"} for a in anns]
    if iou_type == "bbox":  # loadRes would otherwise build box-derived polygons it never uses
        anns = [{k: v for k, v in a.items() if k != "segmentation"} for a in anns]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(anns)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = np.maximum(ev.stats, 0.0)  # -1 means "no ground truth in this range"
    result = {f"{iou_type}_AP": float(stats[0]), f"{iou_type}_AP50": float(stats[1])}
    if iou_type == "bbox":
        result["bbox_precision_by_score"] = precision_by_score(ev)
    return result


SCORE_BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # lower edges of `precision_by_score`'s bins


def precision_by_score(ev: COCOeval | None) -> dict[str, dict]:
    """What a box's score is worth: of the boxes an evaluated COCOeval judged (those of the ground truth's
    categories, at most its last maxDets per image and class, crowd matches aside; none without one), by score
    bin, how many there are and the share that COCOeval matched to an object of their class at IoU 0.5 (None
    for a bin with no box)."""
    scores, right = [np.zeros(0)], [np.zeros(0, dtype=bool)]
    for e in [] if ev is None else ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0]:  # the first range is every area
            continue
        counted = ~np.asarray(e["dtIgnore"][0], dtype=bool)
        scores.append(np.asarray(e["dtScores"], dtype=float)[counted])
        right.append(np.asarray(e["dtMatches"][0])[counted] > 0)
    scores, right = np.concatenate(scores), np.concatenate(right)
    bins = np.digitize(scores, SCORE_BINS[1:])
    boxes = np.bincount(bins, minlength=len(SCORE_BINS))
    hits = np.bincount(bins, weights=right, minlength=len(SCORE_BINS))
    names = [f"{low}-{high}" for low, high in pairwise(SCORE_BINS)] + [f">={SCORE_BINS[-1]}"]
    return {name: {"boxes": int(n), "precision": float(h / n) if n else None}
            for name, n, h in zip(names, boxes, hits, strict=True)}


class SegmentationMeter:
    """Streamed confusion counts of label maps against ground truth: per-class IoU, mIoU, pixel accuracy
    (ignored pixels excluded) and the share of pixels ignored (report both: a wide band can fake mIoU)."""

    def __init__(self, ignore: int) -> None:
        self.ignore = ignore
        self.intersection: dict[int, int] = defaultdict(int)
        self.union: dict[int, int] = defaultdict(int)
        self.correct = self.scored = self.pixels = 0

    def accumulate(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        predicted, truth = np.asarray(predicted), np.asarray(truth)
        kept = predicted != self.ignore
        self.pixels += predicted.size
        self.scored += int(kept.sum())
        p, t = predicted[kept].astype(np.int64), truth[kept].astype(np.int64)
        self.correct += int((p == t).sum())
        for c in np.union1d(np.unique(p), np.unique(t)).tolist():
            self.intersection[c] += int(((p == c) & (t == c)).sum())
            self.union[c] += int(((p == c) | (t == c)).sum())

    def compute(self) -> dict:
        iou = {c: self.intersection[c] / self.union[c] for c in sorted(self.union) if self.union[c]}
        return {"mIoU": float(np.mean(list(iou.values()))) if iou else 0.0,
                "pixel_accuracy": self.correct / max(self.scored, 1),
                "ignored_share": 1 - self.scored / max(self.pixels, 1),
                "per_class_iou": {str(c): round(v, 4) for c, v in iou.items()}}


def evaluate_label_maps(gt_path: Path, folder: Path) -> dict:
    """Score a folder of label-map PNGs (camlabel export-masks: the image's path below its source, `.png`
    added) against COCO ground truth; objects are drawn largest first, so a small object on a large one keeps
    its pixels. Says how many ground-truth images had a PNG: the figures are over those alone."""
    gt = load_ground_truth(gt_path)  # quietly: stdout carries the JSON result
    if not all("segmentation" in a for a in gt.dataset["annotations"]):
        raise EvaluationError(f"{gt_path} holds objects without a segmentation: label maps are scored against masks")
    folder = Path(folder)
    pngs = by_tail((png.relative_to(folder).as_posix().removesuffix(".png"), png) for png in folder.rglob("*.png"))
    meter, scored = None, 0
    for image in gt.dataset["images"]:
        path = find_by_tail(image["file_name"], pngs)
        if path is None:
            continue
        try:
            with Image.open(path, formats=["PNG"]) as png:  # nothing else, whatever its name
                mode = png.mode
                predicted = np.array(png).astype(np.int64)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise EvaluationError(f"{path}: not a readable PNG label map ({exc})") from None
        if mode not in ("L", "P", "I;16", "I"):
            raise EvaluationError(f"{path}: a {mode} image; a label map holds one class value a pixel (L, P or 16-bit)")
        meter = meter or SegmentationMeter(255 if mode in ("L", "P") else 65535)
        if predicted.shape != (image["height"], image["width"]):
            raise EvaluationError(f"{path} is {predicted.shape[1]}x{predicted.shape[0]}, its image "
                                  f"{image['file_name']} {image['width']}x{image['height']}: a label map is at its "
                                  "image's size")
        truth = np.zeros((image["height"], image["width"]), np.int64)
        for a in sorted(gt.imgToAnns[image["id"]], key=lambda a: -a["area"]):
            truth[mask_utils.decode(gt.annToRLE(a)).astype(bool)] = a["category_id"]
        meter.accumulate(predicted, truth)
        scored += 1
    if meter is None:
        raise EvaluationError(f"no PNG in {folder} matches an image of {gt_path}")
    return {**meter.compute(), "images_scored": scored, "images_without_png": len(gt.dataset["images"]) - scored}


def by_tail(named: Iterable[tuple[str, T]]) -> dict[str, list[T]]:
    """Each (path, item) under every tail of its path (`sub/a.jpg`: `sub/a.jpg` and `a.jpg`), for `find_by_tail`.
    Two lists of one collection's images name them below different roots (a run: absolute paths; ground truth:
    below its image folder, or bare names); tails match them without knowing either root."""
    index: dict[str, list[T]] = {}
    for path, item in named:
        parts = path.strip("/").split("/")
        for i in range(len(parts)):
            index.setdefault("/".join(parts[i:]), []).append(item)
    return index


def find_by_tail(path: str, index: dict[str, list[T]]) -> T | None:
    """The item whose path shares the longest tail with `path` (None when none shares its file name); an
    EvaluationError when two do, rather than a guess (a.jpg in two folders, named bare)."""
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        found = index.get("/".join(parts[i:]))
        if found:
            if len(found) > 1:
                raise EvaluationError(f"{path}: {len(found)} images match it ({found[0]}, {found[1]}, ...); "
                                      "name the images by their folders too")
            return found[0]
    return None
