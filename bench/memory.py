"""Peak memory of one annotate actor's work on one large photo, on CPU: JPEG bytes to labels.

    python -m bench.memory [--megapixels 1,12,60]

Each size and setting runs in a fresh process (its peak RSS is its own): scikit-image's cat photo
resized to that many megapixels (4:3), encoded as JPEG, decoded by camlabel, annotated at the default
settings on one thread, with its three cat labels and without labels (where the look's pass keeps its
graph for the classes it names). Issue 17's bound: a 60 MP photo within 2 GB.

Then what that kept graph holds, which grows with the batch where a photo's peak does not: the bytes the
look's pass saves for the backward pass of the named classes' detail map (every tensor the autograd
graph keeps, counted once per storage), per image of a batch of 1 and 8 images at two shapes, in float32
and bfloat16. The model's weights are among them, shared by the batch.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from datetime import date

from bench import in_fresh_process


def one(megapixels: float, labelled: bool) -> dict:
    import torch
    from camlabel.schemas.config import AnnotateSettings
    from camlabel.workers.annotator import Annotator
    from camlabel.workers.decode import decode
    from camlabel.workers.models import load_model
    from PIL import Image
    from skimage import data

    torch.set_num_threads(1)
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(width * 3 / 4)
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((width, height)).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    del buffer
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    annotator = Annotator(load_model(device="cpu"), AnnotateSettings())
    start = time.perf_counter()
    image = decode(jpeg)
    result = annotator([image], [[281, 282, 285]] if labelled else None)
    return {"megapixels": round(width * height / 1e6, 1), "size": f"{width}x{height}",
            "labels": len(result.labels[0]), "seconds": round(time.perf_counter() - start, 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "before_mib": round(before / 1024)}


def kept_graph() -> None:
    import torch
    from camlabel.schemas.config import AnnotateSettings
    from camlabel.workers.annotator import detail_layer
    from camlabel.workers.heatmaps import class_maps
    from camlabel.workers.models import load_model

    torch.set_num_threads(1)
    loaded = load_model(device="cpu")
    layer = detail_layer(loaded, AnnotateSettings())
    saved: dict[int, int] = {}

    def keep(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    print(f"\nThe look's kept graph (down to {layer}), MiB per image of the batch\n")
    print("| input | batch | float32 | bfloat16 |")
    print("|---|---|---|---|")
    for shape in ((448, 448), (448, 597)):
        for batch in (1, 8):
            images, per_image = torch.rand(batch, 3, *shape), []
            for half in (False, True):
                saved.clear()
                with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                        torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
                    class_maps(loaded.model, images, target_layer=loaded.target_layer, detail_layer=layer)
                per_image.append(f"{sum(saved.values()) / 2**20 / batch:.1f}")
            print(f"| {shape[0]}x{shape[1]} | {batch} | {' | '.join(per_image)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", default="1,12,60")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=("labels", "no labels"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.setting == "labels")))
        return
    print(f"{date.today()}: peak RSS of one process, JPEG bytes to labels, CPU, one thread\n")
    print("| megapixels | size | setting | boxes | seconds | peak MiB (before the work: the photo's JPEG, torch) |")
    print("|---|---|---|---|---|---|")
    for mp in (float(m) for m in args.megapixels.split(",")):
        for setting in ("labels", "no labels"):
            r = in_fresh_process("bench.memory", str(mp), "--setting", setting)
            print(f"| {r['megapixels']} | {r['size']} | {setting} | {r['labels']} | {r['seconds']} | {r['peak_mib']} "
                  f"({r['before_mib']}) |", flush=True)
    kept_graph()


if __name__ == "__main__":
    main()
