"""Label maps on ../shared/benchmarks/stamps-public: mIoU with and without the ignore band.

    python -m bench.segmentation [--limit N] [--bands 0.6:0.6,0.3:0.6,0.2:0.7]

The same maps camlabel stores (refined, at most 64 px a side, float16), turned into label maps exactly
as `camlabel export-masks` does, scored against the exact ground-truth masks (ignored pixels excluded;
the ignored share reported beside, since a wide band can fake a high mIoU).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from camlabel.pipeline.evaluate import SegmentationMeter
from camlabel.pipeline.masks import decode_heatmaps, label_map
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.actor import stored_heatmaps
from camlabel.workers.annotator import Annotator
from camlabel.workers.models import load_model
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image

DATA = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/stamps-public"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--bands", default="0.6:0.6,0.3:0.6,0.2:0.7")
    args = parser.parse_args()
    torch.set_num_threads(2)
    gt = json.loads((args.data / "gt.json").read_text())
    with open(args.data / "labels.csv") as f:
        labels = {row["file_name"]: [int(x) for x in row["labels"].split()] for row in csv.DictReader(f)}
    by_image: dict[int, list[dict]] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    bands = [tuple(float(x) for x in band.split(":")) for band in args.bands.split(",")]
    meters = {band: SegmentationMeter(65535) for band in bands}
    annotator = Annotator(load_model(), AnnotateSettings())
    images = sorted(gt["images"], key=lambda im: im["file_name"])[: args.limit]
    for start in range(0, len(images), 8):
        chunk = images[start : start + 8]
        pixels = [decode_image(str(args.data / "images" / im["file_name"]), mode=ImageReadMode.RGB) for im in chunk]
        result = annotator(pixels, [labels[im["file_name"]] for im in chunk])
        for j, im in enumerate(chunk):
            maps, categories = decode_heatmaps(stored_heatmaps(result.maps[j], result.classes[j]))
            truth = torch.zeros(im["height"], im["width"], dtype=torch.int32)
            for a in sorted(by_image[im["id"]], key=lambda a: -a["area"]):
                truth[torch.from_numpy(mask_utils.decode(a["segmentation"]).astype(bool))] = a["category_id"]
            for (low, high), meter in meters.items():
                meter.accumulate(label_map(maps, categories, im["height"], im["width"], low, high, ignore=65535),
                                 truth)
    print(f"{len(images)} images of stamps-public, image-level labels, default settings\n")
    print("| ignore band (LOW:HIGH) | mIoU | pixel accuracy | ignored share |")
    print("|---|---|---|---|")
    for (low, high), meter in meters.items():
        r = meter.compute()
        name = "none" if low == high else f"{low}:{high}"
        print(f"| {name} | {r['mIoU']:.3f} | {r['pixel_accuracy']:.3f} | {r['ignored_share']:.3f} |")


if __name__ == "__main__":
    main()
