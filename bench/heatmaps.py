"""Heatmap speed, side by side in one run: plain forward vs camlabel's methods vs pytorch-grad-cam.

    pip install -e ".[bench]"   # pytorch-grad-cam, the peer
    python -m bench.heatmaps [--models mobilenet_v2,resnet50] [--batch 32] [--size 224] [--threads 1,2]
        [--precisions float32,bfloat16]

Random-init weights (speed does not depend on them); the same model, batch and layer for everyone.
Prints a Markdown table: images/s and the ratio to the plain forward pass on the same batch, in the
same precision (bfloat16: every call under bfloat16 autocast, as `--precision bfloat16` runs the model).
"""

from __future__ import annotations

import argparse
import time
from datetime import date

import torch
from camlabel.workers.heatmaps import compute_heatmaps
from camlabel.workers.models import load_model


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def peers(model, layer, batch):
    """pytorch-grad-cam's GradCAM and EigenCAM on the same model and layer, if installed."""
    try:
        from pytorch_grad_cam import EigenCAM, GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return {}
    module = dict(model.named_modules())[layer]
    targets = [ClassifierOutputTarget(1)] * len(batch)

    def run(cls):
        def go():
            with cls(model=model, target_layers=[module]) as cam:
                cam(input_tensor=batch, targets=targets)
        return go

    return {"pytorch-grad-cam GradCAM": run(GradCAM), "pytorch-grad-cam EigenCAM": run(EigenCAM)}


def contenders(model, layer: str, batch, methods: list[str]) -> dict:
    """name -> zero-argument call: the plain forward first (the ratios' base), ours, then the peer's."""

    def forward():
        with torch.no_grad():
            model(batch)

    runs = {"plain forward": forward}
    for method in methods:
        runs[f"camlabel {method}"] = lambda m=method: compute_heatmaps(model, batch, target_layer=layer,
                                                                       method=m, top_k=1)
    runs.update(peers(model, layer, batch))
    return runs


def in_precision(fn, device: str, precision: str):
    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            fn()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", default="cam,gradcam,gradcam++,eigencam")
    parser.add_argument("--precisions", default="float32")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads max)"
    print(f"{date.today()} on {name}, batch {args.batch}, {args.size}x{args.size}, torch {torch.__version__}\n")
    print("| model | threads | precision | what | images/s | x forward |")
    print("|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        loaded = load_model(model_name, weights=None, device=device)
        model, layer = loaded.model, loaded.target_layer
        batch = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(
            memory_format=torch.channels_last)
        for threads in [int(t) for t in args.threads.split(",")] if device == "cpu" else [0]:
            if threads:
                torch.set_num_threads(threads)

            runs = contenders(model, layer, batch, args.methods.split(","))
            for precision in args.precisions.split(","):
                base = None
                for what, fn in runs.items():
                    seconds = timed(in_precision(fn, device, precision), args.repeats)
                    base = base or seconds
                    print(f"| {model_name} | {threads or '-'} | {precision} | {what} | {args.batch / seconds:.1f} | "
                          f"{base / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
