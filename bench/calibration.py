"""Do thresholds calibrated on a few labelled images carry over to other images?

    python -m bench.calibration [--data DIR] [--calibrate 100] [--method cam]

Runs `camlabel calibrate`'s search on the first --calibrate images of stamps-public (their exact boxes
and masks), then scores the remaining images, from the same maps, at the default thresholds and at the
calibrated ones. Image-level labels choose the classes, as in the weakly supervised setting.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from camlabel.pipeline.calibrate import CalibrationSet, calibrate
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.annotator import Annotator
from camlabel.workers.models import load_model

from bench.localisation import DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--calibrate", type=int, default=100, help="images the thresholds are chosen on")
    parser.add_argument("--method", default="cam")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    paths = sorted(str(p) for p in (args.data / "images").iterdir())
    loaded = load_model()
    settings = AnnotateSettings(method=args.method)
    default = Annotator(loaded, settings).rule
    chosen = calibrate(paths[: args.calibrate], args.data / "gt.json", loaded, settings, progress=False)
    held_out = CalibrationSet(paths[args.calibrate :], args.data / "gt.json", loaded, settings, progress=False)
    print(f"{args.method}, default settings; thresholds chosen on {chosen['images']} images, scored on "
          f"{len(held_out)} others\n")
    print("| thresholds (box / mask) | CorLoc | box AP50 | box AP | mask IoU | segm AP50 |")
    print("|---|---|---|---|---|---|")
    for name, box, mask in (("default", default.threshold, default.mask_threshold),
                            ("calibrated", chosen["threshold"], chosen["mask_threshold"])):
        s = held_out.score(box, mask)
        print(f"| {name} ({box:.2f} / {mask:.2f}) | {s['corloc']:.3f} | {s['bbox_AP50']:.3f} | {s['bbox_AP']:.3f} | "
              f"{s['mean_mask_iou']:.3f} | {s.get('segm_AP50', 0):.3f} |")


if __name__ == "__main__":
    main()
