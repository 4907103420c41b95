"""Fifteen real photographs with boxes drawn by eye: a check on real pictures beside the composites.

    python -m bench.real_photos /tmp/sets/real-photos
    python -m bench.localisation --methods cam --settings labels,predicted,paper --data /tmp/sets/real-photos

The photos are those Debian's `opencv-doc` and scikit-image ship that show an object of an ImageNet class
(16 objects: frame-filling fruit, faces, a dog, a palace and a motorcycle, a tripod beside its cameraman, a
ball at a footballer's feet and one in a player's hands, a squirrel on a branch, a lighter on a desk, an
orange and a lemon side by side). Boxes were drawn on a 50-pixel grid, to within about 5 pixels. Ground-truth
masks are the boxes, so only CorLoc and the box figures mean anything; one object is 6 points of CorLoc.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import skimage
from PIL import Image
from pycocotools import mask as mask_utils

OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
SKIMAGE = Path(skimage.__file__).parent / "data"
# file: (folder, [(ImageNet index, class name, [x, y, w, h])])
PHOTOS = {
    "apple.jpg": (OPENCV, [(948, "Granny Smith", [50, 15, 415, 485])]),
    "baboon.jpg": (OPENCV, [(372, "baboon", [0, 0, 512, 512])]),
    "basketball1.png": (OPENCV, [(430, "basketball", [120, 95, 65, 55])]),
    "chicky_512.png": (OPENCV, [(154, "Pekinese", [95, 30, 400, 482])]),
    "fruits.jpg": (OPENCV, [(950, "orange", [72, 45, 273, 430]), (951, "lemon", [318, 248, 194, 232])]),
    "home.jpg": (OPENCV, [(698, "palace", [95, 15, 417, 369])]),
    "messi5.jpg": (OPENCV, [(805, "soccer ball", [336, 288, 52, 48])]),
    "orange.jpg": (OPENCV, [(950, "orange", [40, 55, 420, 425])]),
    "squirrel_cls.jpg": (OPENCV, [(335, "fox squirrel", [130, 105, 230, 250])]),
    "stuff.jpg": (OPENCV, [(626, "lighter", [315, 312, 42, 148])]),
    "camera.png": (SKIMAGE, [(872, "tripod", [228, 200, 177, 312])]),
    "chelsea.png": (SKIMAGE, [(285, "Egyptian cat", [0, 0, 410, 300])]),
    "coffee.png": (SKIMAGE, [(967, "espresso", [75, 15, 405, 370])]),
    "horse.png": (SKIMAGE, [(339, "sorrel", [15, 10, 375, 302])]),
    "motorcycle_left.png": (SKIMAGE, [(665, "moped", [92, 65, 593, 385])]),
}


def box_mask(box: list[int], width: int, height: int) -> dict:
    x, y, w, h = box
    pixels = np.zeros((height, width), np.uint8, order="F")
    pixels[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(pixels)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, categories, rows = [], [], {}, ["file_name,labels"]
    for image_id, (name, (folder, objects)) in enumerate(sorted(PHOTOS.items()), 1):
        shutil.copyfile(folder / name, out / "images" / name)
        width, height = Image.open(folder / name).size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for index, class_name, (x, y, w, h) in objects:
            w, h = min(w, width - x), min(h, height - y)
            categories[index] = class_name
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": index + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": box_mask([x, y, w, h], width, height)})
        rows.append(f"{name},{' '.join(str(index) for index, _, _ in objects)}")
    gt = {"info": {"description": "real photographs (opencv-doc, scikit-image), boxes drawn by eye"},
          "images": images, "annotations": annotations,
          "categories": [{"id": i + 1, "name": n, "imagenet_index": i} for i, n in sorted(categories.items())]}
    (out / "gt.json").write_text(json.dumps(gt))
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"{len(images)} photos, {len(annotations)} objects in {out}")


if __name__ == "__main__":
    main()
