"""End-to-end speed of `camlabel annotate`, side by side in one run, on ../shared/benchmarks/stamps-public.

    python -m bench.pipeline [--images 320] [--quality-images 64] [--input-size 448]

Rows: the model's plain forward pass on already decoded tensors (the ceiling); the glue a user writes
today (pytorch-grad-cam per image + the CAM paper's 20% rule with scipy + pycocotools RLE); camlabel's
whole job (JPEG bytes to Parquet) with 1 and 2 actors, in its fast setting (one scale, no flip, no
refinement) and its default quality setting, in float32 and under bfloat16 autocast, without labels
(a quick look names the objects first) and, last, with the set's image-level labels (no look). "whole job" includes
starting the actors and loading the model; "steady" is each actor's images per second of its own work (decode,
annotate, write: the manifest's `steady_images_per_second`), times the actors. Ratios are to the
plain float32 forward pass and to the glue (which runs in float32, as users write it).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import ray
import torch
from camlabel.pipeline.job import annotate
from camlabel.schemas.config import JobConfig
from camlabel.workers.annotator import shape_groups
from camlabel.workers.models import load_model
from camlabel.workers.preprocess import prepare_batch
from pycocotools import mask as mask_utils
from scipy import ndimage
from torchvision.io import ImageReadMode, decode_image

DATA = Path(__file__).resolve().parents[1].parent / "shared/benchmarks/stamps-public/images"


def plain_forward(paths, input_size: int, batch_size: int, precision: str = "float32") -> float:
    torch.set_num_threads(2)
    loaded = load_model()
    images = [decode_image(str(p), mode=ImageReadMode.RGB) for p in paths]
    batches = []  # the same shape groups camlabel uses, so neither side pays for padding the other does not
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        for group in shape_groups(chunk, input_size).values():
            batch, _ = prepare_batch([chunk[j] for j in group], input_size, "cpu")
            batches.append(batch.contiguous(memory_format=torch.channels_last))
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        for b in batches:
            loaded.model(b)
    return len(images) / (time.perf_counter() - start)


def glue(paths, input_size: int) -> float:
    """What users write today: pytorch-grad-cam one image at a time, the paper's rule, RLE."""
    from pytorch_grad_cam import GradCAM

    torch.set_num_threads(2)
    loaded = load_model()
    start = time.perf_counter()
    with GradCAM(model=loaded.model, target_layers=[dict(loaded.model.named_modules())[loaded.target_layer]]) as cam:
        for p in paths:
            image = decode_image(str(p), mode=ImageReadMode.RGB)
            batch, _ = prepare_batch([image], input_size, "cpu")
            heat = cam(input_tensor=batch, targets=None)[0]
            heat = torch.nn.functional.interpolate(torch.from_numpy(heat)[None, None], size=image.shape[-2:],
                                                   mode="bilinear")[0, 0].numpy()
            kept = heat >= 0.2 * heat.max()
            labels, n = ndimage.label(kept)
            if n:
                largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
                ys, xs = np.nonzero(labels == largest)
                _box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                mask_utils.encode(np.asfortranarray(kept.astype(np.uint8)))
    return len(paths) / (time.perf_counter() - start)


def job(source: Path, actors: int, input_size: int, fast: bool, method: str = "cam",
        precision: str = "float32", labels: Path | None = None) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(prefix="camlabel-bench-"))
    try:
        options = {"flip": False, "refine": False, "scales": [1.0]} if fast else {}
        config = JobConfig(source=str(source), out=str(out / "run"), actors=actors, input_size=input_size,
                           method=method, precision=precision, labels=labels and str(labels), **options)
        manifest = annotate(config, progress=False)
        return manifest["counts"]["this_run"] / manifest["seconds"], manifest.get("steady_images_per_second", 0)
    finally:
        shutil.rmtree(out)


def linked(paths) -> Path:
    """A folder of links to `paths`: the job's source."""
    source = Path(tempfile.mkdtemp(prefix="camlabel-src-"))
    for p in paths:
        (source / p.name).symlink_to(p.resolve())
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--quality-images", type=int, default=64, help="images for the default quality setting")
    parser.add_argument("--input-size", type=int, default=448)
    args = parser.parse_args()
    if importlib.util.find_spec("pytorch_grad_cam") is None:  # fail before the first row, not at the glue's
        raise SystemExit('the glue row needs pytorch-grad-cam: .venv/bin/pip install -e ".[bench]"')
    paths = sorted(args.data.glob("*.jpg"))[: args.images]
    sources = {"fast": linked(paths), "default": linked(paths[: args.quality_images])}
    print(f"{date.today()}, stamps-public, shorter side {args.input_size}, {torch.get_num_threads()} CPU threads "
          f"available, torch {torch.__version__}; {len(paths)} images, the default setting on the first "
          f"{min(len(paths), args.quality_images)}\n")
    print("| what | images/s (whole job / steady) | x plain forward (whole job / steady) | x glue (steady) |")
    print("|---|---|---|---|")
    base = plain_forward(paths, args.input_size, 8)
    glue_speed = glue(paths, args.input_size)
    half = plain_forward(paths, args.input_size, 8, "bfloat16")
    for name, speed in (("plain forward, decoded tensors, batches of 8 in shape groups, 2 threads", base),
                        ("plain forward as above, bfloat16 autocast", half),
                        ("pytorch-grad-cam Grad-CAM per image + 20% rule + RLE, 2 threads", glue_speed)):
        print(f"| {name} | {speed:.2f} | {speed / base:.2f} | {speed / glue_speed:.2f} |", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    job(sources["default"], 1, args.input_size, True)  # warm Ray's worker pool once, for every row alike
    labels = args.data.parent / "labels.csv"
    rows = [(True, actors, method, "float32", None) for actors in (1, 2) for method in ("cam", "gradcam")]
    rows += [(True, 2, "cam", "bfloat16", None), (False, 2, "cam", "float32", None),
             (False, 2, "cam", "bfloat16", None), (True, 2, "cam", "bfloat16", labels),
             (False, 2, "cam", "bfloat16", labels)]
    for fast, actors, method, precision, given in rows:
        whole, steady = job(sources["fast" if fast else "default"], actors, args.input_size, fast, method, precision,
                            given)
        setting = ("fast (1 scale, no flip, no refinement)" if fast
                   else "default (3 scales, the two smaller mirrored, refined)")
        print(f"| camlabel annotate {method}, {setting}, {precision}, {actors} actor(s){', labels' if given else ''} | "
              f"{whole:.2f} / {steady:.2f} | {whole / base:.2f} / {steady / base:.2f} | {steady / glue_speed:.2f} |",
              flush=True)
    ray.shutdown()
    for source in sources.values():
        shutil.rmtree(source)


if __name__ == "__main__":
    main()
