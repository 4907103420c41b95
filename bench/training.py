"""Does fine-tuning a GAP localizer improve the pseudo-labels? The base classifier's CAM against a
trained localizer's, with and without the Grad-CAM guided attention loss, side by side.

    python -m bench.training [--data DIR] [--train 300] [--epochs 8] [--ggam 1.0] [--threshold T --mask-threshold M]

Trains on the first --train images of stamps-public with their image-level labels only (no boxes, no
masks), then scores every model on the remaining images against their exact ground truth, with the raw
maps (one scale, no flip, no refinement) and with the colour refinement.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from camlabel.pipeline.train import TrainConfig, train
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.models import load_model

from bench.localisation import DATA, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", type=int, default=300, help="images trained on; the rest are scored")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ggam", type=float, default=1.0, help="lambda of the GGAM run")
    parser.add_argument("--input-size", type=int, default=448, help="annotation input size")
    parser.add_argument("--threshold", type=float, help="box threshold (default: the rule's)")
    parser.add_argument("--mask-threshold", type=float, help="mask threshold (default: the rule's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with open(args.data / "labels.csv") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["file_name"])
    trained, scored = rows[: args.train], [r["file_name"] for r in rows[args.train :]]
    models = {"base classifier (CAM)": (load_model(), None)}
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        with open(labels, "w", newline="") as f:
            writer = csv.DictWriter(f, ["file_name", "labels"])
            writer.writeheader()
            writer.writerows(trained)
        for name, ggam in (("GAP localizer", 0.0), (f"GAP localizer + GGAM (lambda {args.ggam:g})", args.ggam)):
            start = time.perf_counter()
            spec = train(TrainConfig(images=str(args.data / "images"), labels=str(labels), out=f"{tmp}/{ggam}",
                                     epochs=args.epochs, ggam=ggam), progress=False)
            models[name] = (load_model(model_dir=f"{tmp}/{ggam}"), (time.perf_counter() - start, spec["history"][-1]))
    print(f"trained on {len(trained)} images (labels only), scored on {len(scored)}; {args.epochs} epochs\n")
    print("| model | maps | CorLoc | box AP50 | box AP | mask IoU | segm AP50 | MaxBoxAccV2 | PxAP | "
          "train min | val acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    raw = AnnotateSettings(input_size=args.input_size, scales=(1.0,), flip=False, refine=False,
                           threshold=args.threshold, mask_threshold=args.mask_threshold)
    for name, (loaded, trained_info) in models.items():
        minutes = f"{trained_info[0] / 60:.1f}" if trained_info else "-"
        accuracy = f"{trained_info[1].get('val_accuracy', float('nan')):.2f}" if trained_info else "-"
        for maps, settings in (("raw", raw), ("refined", replace(raw, refine=True))):
            s, _ = run(args.data, settings, use_labels=True, limit=None, loaded=loaded, names=scored)
            print(f"| {name} | {maps} | {s['corloc']:.3f} | {s['bbox_AP50']:.3f} | {s['bbox_AP']:.3f} | "
                  f"{s['mean_mask_iou']:.3f} | {s.get('segm_AP50', 0):.3f} | {s['MaxBoxAccV2']:.3f} | "
                  f"{s['PxAP']:.3f} | {minutes} | {accuracy} |", flush=True)


if __name__ == "__main__":
    main()
