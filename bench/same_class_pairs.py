"""Two objects of one class in every image: what the public sets never hold (their generator picks distinct
classes per image) and real photographs often do (two dogs). The public generator's `compose`, on a config
like bench/sets/*.json; then score it with bench.localisation (box AP50 counts the second object; CorLoc,
the top box of a class per image, cannot find it).

    python -m bench.same_class_pairs bench/sets/other-pairs.json /tmp/sets/other-pairs
    python -m bench.localisation --methods cam --settings labels --threads 1 --data /tmp/sets/other-pairs
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

from PIL import Image

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


if __name__ == "__main__":
    main(*sys.argv[1:3])
