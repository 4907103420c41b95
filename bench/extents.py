"""Which maps each class's extent is cut from, swept in minutes: fine (larger scales) or coarse (smaller).

    python -m bench.extents [--data DIR] [--fine 1.5,2.0] [--coarse 1.0,1.5 --coarse 0.75,1.0,1.5]
        [--spread 4,0.6 --spread 8,0.6 --spread off] [--judge on --judge off]
        [--refine default --refine sigma=0.1 --refine iterations=3,steps=120] [--detail on --detail off]
        [--rule default --rule grow=0.25 --rule large.grow=0.2,mask_threshold=0.55]

With labels, the default cuts small objects from the mean map of its larger scales and large objects from
the mean of its smaller ones, choosing per class (workers.boxes `_large_objects`); the fine mean also holds
the detail map (workers.annotator `Annotator.maps_per_scale`), which --detail off leaves out. Every image's maps at
each scale of --scales are computed once, with image-level labels and the default settings otherwise,
and cached under --cache; a variant then only refines, thresholds and scores, about 15 s per 200 images.
The closer look at small boxes (`BoxRule.closer_look`, a pass of `Annotator` over each box's view) is left out:
where a set has boxes under 2% of the image (other-small; one of stamps-public's) the figures are those
without it, and `bench.localisation` gives the whole default's.

--spread POWER,MIX sets the semantic spread's power and mix (workers.boxes.SPREAD_POWER, SPREAD_MIX) for
a variant, `off` leaves the spread out; each --spread is run with each --coarse. --judge off leaves out the
classifier's judgement of a class's fine box (workers.regions.fine_box_holds); each is run with each.
--refine KEY=VALUE,... sets the colour refinement's parameters for a variant: sigma, steps, radius of the
random walk (workers.boxes.affinity_refine), iterations, bins of the colour model (colour_refine).
--rule FIELD=VALUE,... sets fields of the default rule (workers.boxes.BoxRule: threshold, grow, mask_threshold,
wide_drop, large_share, ...; large.FIELD those of its rule for large objects) for a variant.

Per variant: the default's choice (CorLoc on the first and second half of the set by sorted name, and on
all; box AP50, box AP, mask IoU, segm AP50, boxes per object; box AP50, box AP and mask IoU on each half), then CorLoc
with the fine extent only, the coarse only, and the better of the two for each object (a perfect choice:
where the next gain is).
"""

from __future__ import annotations

import argparse
import csv
import itertools
from dataclasses import replace
from functools import partial
from pathlib import Path
from unittest.mock import patch

import torch
from camlabel.pipeline.evaluate import evaluate, load_ground_truth
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers import boxes
from camlabel.workers.annotator import GROUP_STEP, Annotator, classifier_judge, mean_map, scored_by_crops, shape_groups
from camlabel.workers.boxes import RULES, WORK_STRIDE, BoxRule, pseudo_labels, working_maps
from camlabel.workers.models import load_model
from camlabel.workers.preprocess import prepare_batch
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image

from bench.localisation import DATA

DEFAULT = RULES["instances"]


class CachedSet:
    """A benchmark set's images with their per-scale maps (computed once, then read from `cache`)."""

    def __init__(self, data: Path, cache: Path, scales: tuple[float, ...]) -> None:
        self.data, self.cache, self.scales = data, cache, scales
        self.gt = load_ground_truth(data / "gt.json")
        self.ids = {im["file_name"]: im["id"] for im in self.gt.dataset["images"]}
        self.names = sorted(self.ids)
        with open(data / "labels.csv") as f:
            self.labels = {row["file_name"]: [int(x) for x in row["labels"].split()] for row in csv.DictReader(f)}
        self.annotator = Annotator(load_model(), AnnotateSettings(scales=scales))
        self.input_size = self.annotator.settings.input_size
        self.refined: dict[tuple[str, tuple[float, ...]], torch.Tensor] = {}

    def _input(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the image, its padded network input, valid), padded as the annotator pads its shape group."""
        image = decode_image(str(self.data / "images" / name), mode=ImageReadMode.RGB, apply_exif_orientation=True)
        (rows, cols), = shape_groups([image], self.input_size)
        batch, valid = prepare_batch([image], self.input_size, "cpu", pad_to=(rows * GROUP_STEP, cols * GROUP_STEP))
        return image, batch, valid

    def maps(self, name: str) -> dict:
        path = self.cache / f"{name}.pt"
        cached = torch.load(path, weights_only=True) if path.exists() else {}
        if "detail" not in cached:  # caches made before the detail map lack it
            image, batch, valid = self._input(name)
            with self.annotator.features_captured() as captured:
                kept, per_scale, detail = self.annotator.maps_per_scale([image], batch, valid,
                                                                        torch.tensor([self.labels[name]]))
            cached = {"maps": {s: m.half() for s, m in per_scale.items()}, "classes": kept.classes,
                      "valid": valid, "size": tuple(image.shape[-2:]), "features": captured["features"].half(),
                      "detail": detail.half()}
            self.cache.mkdir(parents=True, exist_ok=True)
            torch.save(cached, path)
        return cached

    def work(self, name: str, scales: tuple[float, ...], spread: str = "default", refine: str = "default",
             detail: bool = False) -> torch.Tensor:
        """The refined mean map of `scales` (and of the detail map, `Annotator.maps_per_scale`, with `detail`), as
        the annotator refines it with the spread and the refinement's parameters given (kept in memory per
        variant)."""
        if (name, scales, spread, refine, detail) not in self.refined:
            cached = self.maps(name)
            _, batch, valid = self._input(name)
            fine_detail = [cached["detail"].float()] if detail else []
            maps = mean_map([cached["maps"][s].float() for s in scales] + fine_detail)
            power, mix = (boxes.SPREAD_POWER, boxes.SPREAD_MIX) if spread in ("default", "off") else map(
                float, spread.split(","))
            with patch.multiple(boxes, SPREAD_POWER=power, SPREAD_MIX=mix, **refinement(refine)):
                self.refined[name, scales, spread, refine, detail] = working_maps(
                    maps, valid, tuple(batch.shape[-2:]), guide=batch,
                    features=None if spread == "off" else cached["features"].float())
        return self.refined[name, scales, spread, refine, detail]

    def predictions(self, fine: tuple[float, ...], coarse: tuple[float, ...] | None, rule,
                    spread: str = "default", judge: bool = True, refine: str = "default", detail: bool = True
                    ) -> list[dict]:
        found = []
        for name in self.names:
            cached = self.maps(name)
            work = self.work(name, fine, spread, refine, detail)
            classes = cached["classes"]
            batch = self._input(name)[1]
            judged = classifier_judge(self.annotator.loaded.model, batch) if judge else None
            labels = pseudo_labels(work, classes, torch.ones(classes.shape), cached["valid"],
                                   tuple(n * WORK_STRIDE for n in work.shape[-2:]), [cached["size"]], rule,
                                   None if coarse is None else self.work(name, coarse, spread, refine), judged,
                                   None if spread == "off" else cached["features"].float())
            if rule.crop_scores:
                labels = scored_by_crops(labels, self.annotator._classify, batch, cached["valid"], [cached["size"]])
            labels = labels[0]
            found += [{"image_id": self.ids[name], "category_id": p.class_index + 1, "bbox": p.bbox,
                       "score": p.score, "segmentation": p.rle, "area": p.area} for p in labels]
        return found


def refinement(refine: str) -> dict:
    """--refine's KEY=VALUE,... as replacements of workers.boxes' refinement functions ({} for default)."""
    walk = {"sigma", "steps", "radius"}
    given = {} if refine == "default" else {k: float(v) if k == "sigma" else int(v)
                                               for k, v in (kv.split("=") for kv in refine.split(","))}
    unknown = set(given) - walk - {"iterations", "bins"}
    if unknown:
        raise SystemExit(f"--refine: unknown {sorted(unknown)}; known: sigma, steps, radius, iterations, bins")
    out = {}
    if walk & set(given):
        out["affinity_refine"] = partial(boxes.affinity_refine, **{k: v for k, v in given.items() if k in walk})
    if {"iterations", "bins"} & set(given):
        out["colour_refine"] = partial(boxes.colour_refine, **{k: v for k, v in given.items() if k not in walk})
    return out


def rule_of(spec: str) -> BoxRule:
    """--rule's FIELD=VALUE,... (large.FIELD for the rule for large objects) as the default rule so changed."""
    fields: dict[str, dict[str, float]] = {"": {}, "large.": {}}
    for kv in [] if spec == "default" else spec.split(","):
        key, _, value = kv.partition("=")
        prefix = "large." if key.startswith("large.") else ""
        fields[prefix][key.removeprefix(prefix)] = float(value)
    try:
        return replace(DEFAULT, **fields[""], large=replace(DEFAULT.large, **fields["large."]))
    except TypeError as e:
        raise SystemExit(f"--rule {spec}: {e}") from None


def hits(gt, preds: list[dict]) -> dict[int, bool]:
    """Ground-truth object id -> whether the top box of its class on its image has IoU >= 0.5 with it."""
    best: dict[tuple[int, int], dict] = {}
    for p in preds:
        key = (p["image_id"], p["category_id"])
        if key not in best or p["score"] > best[key]["score"]:
            best[key] = p
    found = {}
    for g in gt.dataset["annotations"]:
        if g.get("iscrowd", 0):
            continue
        p = best.get((g["image_id"], g["category_id"]))
        found[g["id"]] = p is not None and mask_utils.iou([p["bbox"]], [g["bbox"]], [0])[0, 0] >= 0.5
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--cache", type=Path, help="default: /tmp/camlabel-extents/<set's folder name>")
    parser.add_argument("--scales", default="0.5,0.75,1.0,1.5,2.0", help="computed and cached once")
    parser.add_argument("--fine", default="1.5,2.0", help="the scales small objects are cut from")
    parser.add_argument("--coarse", action="append", help="scales large objects are cut from (repeatable; "
                        "default 1.0,1.5)")
    parser.add_argument("--spread", action="append", help="POWER,MIX of the semantic spread, or off (repeatable; "
                        "default: the default's)")
    parser.add_argument("--judge", action="append", choices=["on", "off"], help="the classifier judging a class's "
                        "fine box (repeatable; default on)")
    parser.add_argument("--refine", action="append", help="KEY=VALUE,... of the colour refinement (sigma, steps, "
                        "radius, iterations, bins), or default (repeatable)")
    parser.add_argument("--detail", action="append", choices=["on", "off"], help="the detail map in the fine mean "
                        "(repeatable; default on)")
    parser.add_argument("--rule", action="append", help="FIELD=VALUE,... of the default rule (large.FIELD: its "
                        "rule for large objects), or default (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scales = tuple(float(x) for x in args.scales.split(","))
    data = CachedSet(args.data, args.cache or Path("/tmp/camlabel-extents") / args.data.name, scales)
    fine = tuple(float(x) for x in args.fine.split(","))
    half = len(data.names) // 2
    halves = [{data.ids[n] for n in data.names[:half]}, {data.ids[n] for n in data.names[half:]}]
    print(f"{args.data.name}, fine extent from scales {args.fine}\n")
    print("| coarse scales | spread | judge | refine | detail | rule | CorLoc first / second half | CorLoc | "
          "box AP50 | box AP | mask IoU | segm AP50 | boxes/object | box AP50, box AP first / second half | "
          "CorLoc fine only / coarse only / better of the two |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant, spread, judge, refine, detail, spec in itertools.product(
            args.coarse or ["1.0,1.5"], args.spread or ["default"], args.judge or ["on"], args.refine or ["default"],
            args.detail or ["on"], args.rule or ["default"]):
        coarse = tuple(float(x) for x in variant.split(","))
        rule = rule_of(spec)
        chosen = data.predictions(fine, coarse, rule, spread, judge == "on", refine, detail == "on")
        r = evaluate(data.gt, chosen)
        by_half = [evaluate(load_ground_truth(args.data / "gt.json", h), [p for p in chosen if p["image_id"] in h])
                   for h in halves]
        fine_hits = hits(data.gt, data.predictions(fine, None, replace(rule, large=None), spread, refine=refine,
                                                   detail=detail == "on"))
        coarse_hits = hits(data.gt, data.predictions(coarse, None, rule.large, spread, refine=refine, detail=False))
        n = len(fine_hits)
        either = sum(fine_hits[k] or coarse_hits[k] for k in fine_hits)
        print(f"| {variant} | {spread} | {judge} | {refine} | {detail} | {spec} | "
              f"{by_half[0]['corloc']:.3f} / {by_half[1]['corloc']:.3f} | {r['corloc']:.3f} | {r['bbox_AP50']:.3f} | "
              f"{r['bbox_AP']:.3f} | {r['mean_mask_iou']:.3f} | "
              f"{r.get('segm_AP50', 0):.3f} | "
              f"{r['boxes_per_object']:.2f} | {by_half[0]['bbox_AP50']:.3f}, {by_half[0]['bbox_AP']:.3f}, "
              f"{by_half[0]['mean_mask_iou']:.3f} / {by_half[1]['bbox_AP50']:.3f}, {by_half[1]['bbox_AP']:.3f}, "
              f"{by_half[1]['mean_mask_iou']:.3f} | "
              f"{sum(fine_hits.values()) / n:.3f} / {sum(coarse_hits.values()) / n:.3f} / {either / n:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
