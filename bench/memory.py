"""Peak memory of one annotate actor's work on one large photo, on CPU: JPEG bytes to labels.

    python -m bench.memory [--megapixels 1,12,60]

Each size runs in a fresh process (its peak RSS is its own): scikit-image's cat photo resized to that
many megapixels (4:3), encoded as JPEG, decoded by camlabel, annotated with its label at the default
settings on one thread. Issue 17's bound: a 60 MP photo within 2 GB.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import time
from datetime import date

from bench import in_fresh_process


def one(megapixels: float) -> dict:
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
    result = annotator([image], [[281, 282, 285]])
    return {"megapixels": round(width * height / 1e6, 1), "size": f"{width}x{height}",
            "labels": len(result.labels[0]), "seconds": round(time.perf_counter() - start, 1),
            "peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "before_mib": round(before / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", default="1,12,60")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(f"{date.today()}: peak RSS of one process, JPEG bytes to labels, CPU, one thread\n")
    print("| megapixels | size | labels | seconds | peak MiB (before the work: the photo's JPEG, torch) |")
    print("|---|---|---|---|---|")
    for mp in (float(m) for m in args.megapixels.split(",")):
        r = in_fresh_process("bench.memory", str(mp))
        print(f"| {r['megapixels']} | {r['size']} | {r['labels']} | {r['seconds']} | {r['peak_mib']} "
              f"({r['before_mib']}) |", flush=True)


if __name__ == "__main__":
    main()
