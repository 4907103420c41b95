"""Real photographs with boxes drawn by eye: a check on real pictures beside the composites.

    python -m bench.real_photos /tmp/sets/real-photos
    python -m bench.real_photos --source games /tmp/sets/real-photos-games
    python -m bench.localisation --methods cam --settings labels,predicted,paper --data /tmp/sets/real-photos

`docs` (the default): the photos Debian's `opencv-doc` and scikit-image ship that show an object of an
ImageNet class (15 photos, 16 objects: frame-filling fruit, faces, a dog, a palace and a motorcycle, a tripod
beside its cameraman, a ball at a footballer's feet and one in a player's hands, a squirrel on a branch, a
lighter on a desk, an orange and a lemon side by side). Boxes were drawn on a 50-pixel grid, to within about 5
pixels; one object is 6 points of CorLoc.

`games`: made on 2026-12-05, after every choice of the default, and used to make none: the photos of two
children's games, Debian's `gcompris-qt-data` (its farm and world animals, 1024 pixels wide, and its
categorisation game's objects and monuments, 320) and `jigzo-data` (its puzzles' pictures), that show objects
of an ImageNet class whose every instance could be boxed without doubt (32 photos, 39 objects: four hens
pecking side by side, three cows, two jaguars one behind the other, a clownfish and its young, frame-filling
balls, a penguin's and a horse's heads, tools on plain ground, monuments, a castle behind trees). The pictures
are read from the packages' Qt resource files and puzzle files. Boxes drawn by eye on a 20- or 50-pixel grid.
Each photo's labels name each of its classes once.

In both, ground-truth masks are the boxes, so only CorLoc and the box figures mean anything.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import struct
from functools import cache
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


GCOMPRIS = Path("/usr/share/gcompris-qt/rcc")
JIGZO = Path("/usr/share/games/jigzo/puzzles/00_default")
# file: (GCompris resource file (.rcc) or jigzo puzzle (.pzl), [(ImageNet index, class name, [x, y, w, h])])
GAMES = {
    "cow": ("explore_farm_animals.rcc", [(345, "ox", [234, 290, 690, 405]), (345, "ox", [268, 180, 157, 100]),
                                     (345, "ox", [805, 187, 104, 83])]),
    "sheep": ("explore_farm_animals.rcc", [(348, "ram", [237, 85, 487, 590])]),
    "chicken": ("explore_farm_animals.rcc", [(8, "hen", [41, 124, 181, 395]), (8, "hen", [370, 76, 194, 428]),
                                         (8, "hen", [515, 124, 201, 410]), (8, "hen", [702, 132, 295, 468])]),
    "pig": ("explore_farm_animals.rcc", [(341, "hog", [164, 183, 465, 446])]),
    "dog": ("explore_farm_animals.rcc", [(235, "German shepherd", [51, 26, 855, 698])]),
    "owl": ("explore_farm_animals.rcc", [(24, "great grey owl", [545, 143, 266, 503])]),
    "cat": ("explore_farm_animals.rcc", [(281, "tabby", [187, 107, 829, 456])]),
    "crocodile": ("explore_world_animals.rcc", [(49, "African crocodile", [50, 110, 893, 299])]),
    "dragon": ("explore_world_animals.rcc", [(48, "Komodo dragon", [55, 30, 850, 570])]),
    "jaguar": ("explore_world_animals.rcc", [(290, "jaguar", [161, 234, 321, 380]),
                                             (290, "jaguar", [468, 183, 373, 380])]),
    "panda": ("explore_world_animals.rcc", [(388, "giant panda", [208, 51, 640, 540])]),
    "polar_bear": ("explore_world_animals.rcc", [(296, "ice bear", [249, 251, 599, 326])]),
    "scarlet_macaw": ("explore_world_animals.rcc", [(88, "macaw", [230, 105, 695, 685])]),
    "koala": ("explore_world_animals.rcc", [(105, "koala", [100, 245, 545, 637])]),
    "fish9": ("categorization.rcc", [(393, "anemone fish", [58, 21, 160, 80]),
                                     (393, "anemone fish", [181, 193, 27, 30])]),
    "baseball": ("categorization.rcc", [(429, "baseball", [0, 0, 320, 317])]),
    "volleyball": ("categorization.rcc", [(890, "volleyball", [4, 4, 312, 314])]),
    "pan": ("categorization.rcc", [(567, "frying pan", [27, 58, 250, 146])]),
    "cup": ("categorization.rcc", [(968, "cup", [71, 12, 187, 159])]),
    "pillow": ("categorization.rcc", [(721, "pillow", [0, 58, 269, 163])]),
    "weighingMachine": ("categorization.rcc", [(778, "scale", [23, 33, 268, 200])]),
    "bucket": ("categorization.rcc", [(463, "bucket", [18, 24, 209, 275])]),
    "arcDeTriomphe": ("categorization.rcc", [(873, "triumphal arch", [62, 32, 188, 180])]),
    "IndiaGate": ("categorization.rcc", [(873, "triumphal arch", [143, 12, 130, 163])]),
    "zimniPalace": ("categorization.rcc", [(698, "palace", [0, 25, 320, 154])]),
    "hammer1": ("categorization.rcc", [(587, "hammer", [30, 16, 266, 180])]),
    "screwDriver1": ("categorization.rcc", [(784, "screwdriver", [30, 50, 250, 148])]),
    "castle": ("castle-6x3.pzl", [(483, "castle", [110, 100, 595, 195])]),
    "gorilla": ("gorilla2-3x3.pzl", [(366, "gorilla", [45, 25, 460, 450])]),
    "horse": ("horse-4x3.pzl", [(339, "sorrel", [0, 0, 503, 470])]),
    "penguin": ("penguin-3x2.pzl", [(145, "king penguin", [10, 45, 615, 437])]),
    "train": ("train-2x2.pzl", [(820, "steam locomotive", [77, 80, 420, 380])]),
}


def qt_resources(data: bytes) -> dict[str, bytes]:
    """The files of a Qt resource file (rcc format 1-3) by path; stored uncompressed, as GCompris's pictures are."""
    if data[:4] != b"qres":
        raise ValueError("not a Qt resource file")
    version, tree, start, names = struct.unpack(">IIII", data[4:20])
    node = 22 if version >= 2 else 14
    files: dict[str, bytes] = {}

    def name(offset: int) -> str:
        length = struct.unpack(">H", data[names + offset : names + offset + 2])[0]
        return data[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    def walk(i: int, path: str) -> None:
        at = tree + i * node
        offset, flags = struct.unpack(">IH", data[at : at + 6])
        here = f"{path}/{name(offset)}" if i else ""
        if flags & 2:  # a folder: its children's count and first index
            count, first = struct.unpack(">II", data[at + 6 : at + 14])
            for child in range(first, first + count):
                walk(child, here)
        elif not flags & 5:  # an uncompressed file
            position = start + struct.unpack(">I", data[at + 10 : at + 14])[0]
            size = struct.unpack(">I", data[position : position + 4])[0]
            files[here] = data[position + 4 : position + 4 + size]

    walk(0, "")
    return files


def games_picture(name: str, source: str) -> Image.Image:
    """A picture of `GAMES`: the file `name`.webp of a GCompris resource file (`source` ends in .rcc), or a jigzo
    puzzle's (.pzl: the full picture is the `image` rectangle of its texture, the 1024 x 1024 JPEG)."""
    if source.endswith(".rcc"):
        (data,) = [v for k, v in resources(source).items() if k.endswith(f"/{name}.webp")]
        return Image.open(io.BytesIO(data)).convert("RGB")
    data = (JIGZO / source).read_bytes()
    line = next(x for x in data[:4096].split(b"\n") if x.startswith(b"image "))
    x, y, w, h = map(int, line.split()[1:5])
    start = 0
    while (start := data.find(b"\xff\xd8\xff", start + 1)) >= 0:
        texture = Image.open(io.BytesIO(data[start:]))
        if texture.size == (1024, 1024):
            return texture.convert("RGB").crop((x, y, x + w, y + h))
    raise ValueError(f"{source}: no 1024 x 1024 texture")


@cache
def resources(source: str) -> dict[str, bytes]:
    """A GCompris resource file's files, read once for all its pictures."""
    return qt_resources((GCOMPRIS / source).read_bytes())


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
    parser.add_argument("--source", choices=["docs", "games"], default="docs")
    args = parser.parse_args()
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, categories, rows = [], [], {}, ["file_name,labels"]
    photos = PHOTOS if args.source == "docs" else {f"{k}.png": v for k, v in GAMES.items()}
    for image_id, (name, (folder, objects)) in enumerate(sorted(photos.items()), 1):
        if args.source == "docs":
            shutil.copyfile(folder / name, out / "images" / name)
            width, height = Image.open(folder / name).size
        else:
            picture = games_picture(name.removesuffix(".png"), folder)
            picture.save(out / "images" / name)
            width, height = picture.size
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for index, class_name, (x, y, w, h) in objects:
            w, h = min(w, width - x), min(h, height - y)
            categories[index] = class_name
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": index + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": box_mask([x, y, w, h], width, height)})
        rows.append(f"{name},{' '.join(dict.fromkeys(str(index) for index, _, _ in objects))}")  # each class once
    where = "opencv-doc, scikit-image" if args.source == "docs" else "gcompris-qt-data, jigzo-data"
    gt = {"info": {"description": f"real photographs ({where}), boxes drawn by eye"},
          "images": images, "annotations": annotations,
          "categories": [{"id": i + 1, "name": n, "imagenet_index": i} for i, n in sorted(categories.items())]}
    (out / "gt.json").write_text(json.dumps(gt))
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"{len(images)} photos, {len(annotations)} objects in {out}")


if __name__ == "__main__":
    main()
