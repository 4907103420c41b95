"""Two objects of one class in every image: what the public sets never hold (their generator picks distinct
classes per image) and real photographs often do (two dogs). The public generator's `compose`, on a config
like bench/sets/*.json; then score it with bench.localisation (box AP50 counts the second object; CorLoc,
the top box of a class per image, cannot find it).

    python -m bench.same_class_pairs bench/sets/other-pairs.json /tmp/sets/other-pairs
    python -m bench.localisation --methods cam --settings labels --threads 1 --data /tmp/sets/other-pairs
    python -m bench.same_class_pairs --found /tmp/sets/other-pairs

--found: with labels and the default settings, in how many images none, one or both of the two objects are
found by some box of their class (IoU >= 0.5), by how the two lie: overlapping, apart, or near (their boxes
less than a tenth of their mean width or height apart).
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.annotator import Annotator
from camlabel.workers.models import load_model
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.io import ImageReadMode, decode_image

from bench.localisation import read_set

TOOL = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/tools/make_composites.py"
NAMES = "/usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt"


def main(config: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("make_composites", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = json.loads(Path(config).read_text())
    rng = random.Random(cfg["seed"])
    stamps = [s for s in json.loads(Path(cfg["stamps"]).read_text())
              if s["imagenet_index"] in set(cfg["imagenet_indices"])]
    backgrounds = [Image.open(p).convert("RGB") for p in cfg["backgrounds"]]
    names = [line.strip().split(",")[0] for line in Path(NAMES).read_text().splitlines()]
    folder = Path(out)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, rows = [], [], []
    for i in range(cfg["n_images"]):
        first = rng.choice(stamps)  # and the same or another stamp of its class
        pair = [first, rng.choice([s for s in stamps if s["imagenet_index"] == first["imagenet_index"]])]
        image, objects = tool.compose(rng, rng.choice(backgrounds), pair, cfg)
        name = f"{cfg['prefix']}{i:05d}.jpg"
        image.save(folder / "images" / name, "JPEG", quality=rng.randint(*cfg["jpeg_quality"]))
        images.append(dict(id=i + 1, file_name=name, width=image.width, height=image.height))
        # category ids are ImageNet indices + 1, as in the public sets
        annotations += [dict(a, id=len(annotations) + n + 1, image_id=i + 1, category_id=a["category_id"] + 1)
                        for n, a in enumerate(objects)]
        rows.append(f"{name},{first['imagenet_index']}\n")
    used = sorted({a["category_id"] for a in annotations})
    gt = dict(info=dict(description=cfg["description"], seed=cfg["seed"]), images=images, annotations=annotations,
              categories=[dict(id=c, name=names[c - 1], imagenet_index=c - 1) for c in used])
    (folder / "gt.json").write_text(json.dumps(gt))
    (folder / "labels.csv").write_text("file_name,labels\n" + "".join(rows))
    print(f"{len(images)} images, {len(annotations)} objects, {len(used)} classes -> {folder}")


def found(data: Path) -> None:
    """Print how many of each image's two objects some box of their class finds, by how the two lie."""
    torch.set_num_threads(1)
    gt, _, labels, objects = read_set(data)
    annotator = Annotator(load_model(), AnnotateSettings())
    counts: Counter = Counter()
    for im in gt["images"]:
        image = decode_image(str(data / "images" / im["file_name"]), mode=ImageReadMode.RGB,
                             apply_exif_orientation=True)
        a, b = objects[im["id"]]
        boxes = [p.bbox for p in annotator([image], [labels[im["file_name"]]]).labels[0]
                 if p.class_index + 1 == a["category_id"]]
        hits = sum(bool(boxes) and mask_utils.iou(boxes, [o["bbox"]], [0]).max() >= 0.5 for o in (a, b))
        counts[how_they_lie(a["bbox"], b["bbox"]), hits] += 1
    print("| the two objects | images | neither found | one | both |\n|---|---|---|---|---|")
    for lie in ("apart", "near", "overlapping"):
        row = [counts[lie, n] for n in range(3)]
        print(f"| {lie} | {sum(row)} | " + " | ".join(map(str, row)) + " |")


def how_they_lie(a: list[float], b: list[float]) -> str:
    """Two COCO boxes: overlapping, apart, or near (less than a tenth of their mean extent apart)."""
    gap_x = max(a[0], b[0]) - min(a[0] + a[2], b[0] + b[2])
    gap_y = max(a[1], b[1]) - min(a[1] + a[3], b[1] + b[3])
    if gap_x < 0 and gap_y < 0:
        return "overlapping"
    return "near" if max(gap_x, gap_y) < 0.1 * (a[2] + b[2] + a[3] + b[3]) / 4 else "apart"


if __name__ == "__main__":
    if sys.argv[1] == "--found":
        found(Path(sys.argv[2]))
    else:
        main(*sys.argv[1:3])
