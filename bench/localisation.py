"""Localisation quality on ../shared/benchmarks/stamps-public (or --data DIR): methods x settings, one table.

    python -m bench.localisation [--data DIR] [--methods cam,gradcam,eigencam] [--limit N]

Settings: labels (image-level labels choose the classes), predicted (no labels: the top classes propose
regions, each region's crop names it), agnostic (Eigen-CAM objectness, categories from the labels),
paper (the CAM paper's rule at the same input size: one scale, no flip, no refinement, 20% of the max,
the largest component; with labels), peer (what users write today, as issue 14 measured it: pytorch-grad-cam's
Grad-CAM of each labelled class at the shorter side --input-size, then the paper's rule: 20% of the map's max,
the largest component's box, every kept pixel as mask, scored by the class's probability; needs
`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from camlabel.pipeline.evaluate import evaluate
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.annotator import Annotator, box_rule
from camlabel.workers.boxes import BoxRule
from camlabel.workers.models import LoadedModel, load_model
from camlabel.workers.preprocess import IMAGENET_MEAN, IMAGENET_STD
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_iou

from bench.map_meter import MapMeter

DATA = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/stamps-public"


def run(data: Path, settings: AnnotateSettings, use_labels: bool, limit: int | slice | None, batch_size: int = 8,
        loaded: LoadedModel | None = None, names: list[str] | None = None, rule: BoxRule | None = None):
    """Scores and images/s of `loaded` (default: the default model) on the first `limit` images (or a
    slice of them, by sorted file name), or on the images called `names`; rule: the box rule, by default
    the settings'."""
    gt, ids, labels, gt_by_image = read_set(data)
    names = names or sorted(ids)[limit if isinstance(limit, slice) else slice(limit)]
    annotator = Annotator(loaded or load_model(), settings, rule=rule)
    meter = MapMeter()
    preds, naming, start = [], np.zeros(3, dtype=int), time.perf_counter()
    for i in range(0, len(names), batch_size):
        chunk = names[i : i + batch_size]
        images = [decode_image(str(data / "images" / n), mode=ImageReadMode.RGB, apply_exif_orientation=True)
                  for n in chunk]
        result = annotator(images, [labels[n] for n in chunk] if use_labels else None)
        for j, (n, found) in enumerate(zip(chunk, result.labels, strict=True)):
            accumulate_maps(meter, result.maps[j], result.classes[j], gt_by_image[ids[n]], images[j].shape[-2:])
            preds += [{"image_id": ids[n], "category_id": p.class_index + 1, "bbox": p.bbox, "score": p.score,
                       "segmentation": p.rle, "area": p.area} for p in found]
            naming += named_right(gt_by_image.get(ids[n], []), found)
    seconds = time.perf_counter() - start
    return {**scores_on(data, gt, names, preds), **meter.compute(), "named": naming.tolist()}, len(names) / seconds


def named_right(objects: list[dict], found: list) -> np.ndarray:
    """Of an image's objects (COCO annotations), how many some box of `found` covers (IoU >= 0.5, whatever its
    class), how many of those the best such box names right, and how many more one of its runner-ups names
    right (without labels: the classes it was named over, README "Without labels")."""
    if not objects or not found:
        return np.zeros(3, dtype=int)
    xywh = torch.tensor([o["bbox"] for o in objects] + [p.bbox for p in found], dtype=torch.float64)
    corners = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    overlaps = box_iou(corners[: len(objects)], corners[len(objects) :]) >= 0.5
    counts = np.zeros(3, dtype=int)
    for o, over in zip(objects, overlaps, strict=True):
        covering = [found[j] for j in over.nonzero()[:, 0].tolist()]
        if covering:
            best, wanted = max(covering, key=lambda p: p.score), o["category_id"] - 1
            named = best.class_index == wanted
            counts += [1, named, not named and wanted in [c for c, _ in best.runner_ups]]
    return counts


def read_set(data: Path) -> tuple[dict, dict[str, int], dict[str, list[int]], dict[int, list[dict]]]:
    """A benchmark set's ground truth, image ids by file name, labels by file name, and objects by image id."""
    gt = json.loads((data / "gt.json").read_text())
    with open(data / "labels.csv") as f:
        labels = {row["file_name"]: [int(x) for x in row["labels"].split()] for row in csv.DictReader(f)}
    objects: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        objects.setdefault(a["image_id"], []).append(a)
    return gt, {im["file_name"]: im["id"] for im in gt["images"]}, labels, objects


def scores_on(data: Path, gt: dict, names: list[str], preds: list[dict]) -> dict:
    """`evaluate`'s scores of preds against the set's ground truth, of the images called `names` only."""
    if len(names) == len(gt["images"]):
        return evaluate(data / "gt.json", preds)
    subset = {**gt, "images": [im for im in gt["images"] if im["file_name"] in set(names)]}
    keep = {im["id"] for im in subset["images"]}
    subset["annotations"] = [a for a in gt["annotations"] if a["image_id"] in keep]
    tmp = Path("/tmp/camlabel_gt_subset.json")
    tmp.write_text(json.dumps(subset))
    return evaluate(tmp, preds)


def run_peer(data: Path, input_size: int, limit: int | slice | None):
    """`run`'s scores and images/s for the peer glue (the module's docstring), one image at a time."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from scipy import ndimage
    from torchvision.transforms.v2 import functional as TF

    gt, ids, labels, gt_by_image = read_set(data)
    names = sorted(ids)[limit if isinstance(limit, slice) else slice(limit)]
    loaded = load_model()
    model = loaded.model
    meter = MapMeter()
    preds, start = [], time.perf_counter()
    with GradCAM(model=model, target_layers=[model.get_submodule(loaded.target_layer)]) as cam:
        for n in names:
            image = decode_image(str(data / "images" / n), mode=ImageReadMode.RGB, apply_exif_orientation=True)
            height, width = image.shape[-2:]
            x = TF.normalize(TF.resize(image, input_size, antialias=True).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
            with torch.no_grad():
                probability = model(x[None]).float().softmax(1)[0]
            classes = labels[n]
            heats = torch.stack([torch.from_numpy(cam(input_tensor=x[None], targets=[ClassifierOutputTarget(c)])[0])
                                 for c in classes])
            accumulate_maps(meter, heats, torch.tensor(classes), gt_by_image[ids[n]], (height, width))
            full = F.interpolate(heats[None], size=(height, width), mode="bilinear")[0].numpy()
            for c, heat in zip(classes, full, strict=True):
                if heat.max() <= 0:  # no evidence: no box
                    continue
                kept = heat >= 0.2 * heat.max()
                components, _ = ndimage.label(kept)
                ys, xs = np.nonzero(components == np.argmax(np.bincount(components.ravel())[1:]) + 1)
                rle = mask_utils.encode(np.asfortranarray(kept.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                preds.append({"image_id": ids[n], "category_id": c + 1, "score": float(probability[c]),
                              "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                                       float(ys.max() - ys.min() + 1)], "segmentation": rle, "area": int(kept.sum())})
    seconds = time.perf_counter() - start
    return {**scores_on(data, gt, names, preds), **meter.compute()}, len(names) / seconds


def accumulate_maps(meter: MapMeter, maps, classes, objects: list[dict], size) -> None:
    """Each ground-truth class's map (zero if the class was not mapped) against its boxes and mask."""
    h, w = maps.shape[-2:]
    scale_y, scale_x = h / size[0], w / size[1]
    for category in {o["category_id"] for o in objects}:
        mine = [o for o in objects if o["category_id"] == category]
        match = (classes == category - 1).nonzero()
        heatmap = maps[int(match[0, 0])] if len(match) else torch.zeros(h, w)
        boxes = torch.tensor([o["bbox"] for o in mine]) * torch.tensor([scale_x, scale_y, scale_x, scale_y])
        mask = torch.from_numpy(np.any([mask_utils.decode(o["segmentation"]) for o in mine], axis=0))
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0
        meter.accumulate(heatmap, boxes, mask)


def share(value: float | None, digits: int) -> str:
    """A bin's share to print: "none" for a bin that holds nothing (`pipeline.evaluate` gives None there)."""
    return "none" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--methods", default="cam,gradcam,eigencam")
    parser.add_argument("--settings", default="labels,predicted,agnostic,paper")
    parser.add_argument("--input-size", type=int, default=AnnotateSettings.input_size)
    parser.add_argument("--rule", default="instances")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--mask-threshold", type=float)
    parser.add_argument("--no-flip", action="store_true")
    parser.add_argument("--no-refine", action="store_true")
    parser.add_argument("--scales", help="multiples of --input-size whose maps are averaged (default: the method's)")
    parser.add_argument("--precision", default="auto", help="auto, float32 or bfloat16 (model passes)")
    parser.add_argument("--closer-look", type=float, help="the rule's closer_look share (0: no closer look)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--images", help="A:B, the images from A to B (sorted by name), e.g. 200:400")
    logging.basicConfig(level=logging.WARNING)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = AnnotateSettings(input_size=args.input_size, rule=args.rule, threshold=args.threshold,
                            mask_threshold=args.mask_threshold, flip=False if args.no_flip else None,
                            refine=not args.no_refine, precision=args.precision,
                            scales=tuple(float(x) for x in args.scales.split(",")) if args.scales else None)
    print("| method | setting | CorLoc | box IoU | box AP50 | box AP | mask IoU | segm AP50 | segm AP | MaxBoxAccV2 | "
          "PxAP | boxes/object | img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sizes, company, naming, worth = [], [], [], []
    methods = args.methods.split(",")
    if "peer" in args.settings.split(",") and importlib.util.find_spec("pytorch_grad_cam") is None:
        raise SystemExit('--settings peer needs pytorch-grad-cam: .venv/bin/pip install -e ".[bench]"')
    for method in methods:
        for setting in args.settings.split(","):
            if (setting == "agnostic" and method != "eigencam") or (setting == "peer" and method != methods[0]):
                continue  # the peer's row does not depend on the method
            chosen = slice(*(int(x) for x in args.images.split(":"))) if args.images else args.limit
            settings = replace(base, method=method)
            if setting == "paper":
                settings = replace(settings, rule="paper", scales=(1.0,), flip=False, refine=False, threshold=None,
                                   mask_threshold=None)
            if setting == "peer":
                scores, speed = run_peer(args.data, args.input_size, chosen)
            else:
                rule = box_rule(settings)
                if args.closer_look is not None and rule.closer_look:
                    rule = replace(rule, closer_look=args.closer_look)
                scores, speed = run(args.data, settings, setting != "predicted", chosen, rule=rule)
            shown = "pytorch-grad-cam" if setting == "peer" else method
            sizes.append(f"{shown} {setting}: " + ", ".join(
                f"{name} {share(v['corloc'], 2)} of {v['objects']}" for name, v in scores["corloc_by_size"].items()))
            if setting == "predicted":
                covered, right, runner_up = scores["named"]
                naming.append(f"{shown} {setting}: {covered} objects covered by some box (IoU >= 0.5), the best such "
                              f"box named right for {right}, a runner-up right for {runner_up} more")
            by_score = scores["bbox_precision_by_score"]
            worth.append(f"{shown} {setting}: scores " + ", ".join(
                f"{b} {share(v['precision'], 2)} of {v['boxes']}" for b, v in by_score.items()))
            company.append(f"{shown} {setting}: " + ", ".join(
                f"{name} {share(v['corloc'], 3)} of {v['objects']}" for name, v in scores["corloc_by_company"].items()))
            print(f"| {shown} | {setting} | {scores['corloc']:.3f} | {scores['mean_box_iou']:.3f} | "
                  f"{scores['bbox_AP50']:.3f} | {scores['bbox_AP']:.3f} | {scores['mean_mask_iou']:.3f} | "
                  f"{scores.get('segm_AP50', 0):.3f} | {scores.get('segm_AP', 0):.3f} | {scores['MaxBoxAccV2']:.3f} | "
                  f"{scores['PxAP']:.3f} | {scores['boxes_per_object']:.2f} | {speed:.2f} |", flush=True)
    print("\nCorLoc by object size (its box's share of the image):\n\n" + "\n".join(f"- {s}" for s in sizes))
    print("\nCorLoc of objects alone in their image and of those sharing it:\n")
    print("\n".join(f"- {c}" for c in company))
    print("\nBoxes by score, and the share of them that hit an object of their class (IoU >= 0.5, COCO's matching):\n")
    print("\n".join(f"- {w}" for w in worth))
    if naming:
        print("\nWithout labels, how the boxes over each object are named:\n\n" + "\n".join(f"- {n}" for n in naming))


if __name__ == "__main__":
    main()
