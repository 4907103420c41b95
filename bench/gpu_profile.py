"""Where one batch's time goes on the device: the actor's Annotator call on BATCH stamps images, under
torch.profiler (issue 17: host syncs, kernel launches, GPU busy time).

    python -m bench.gpu_profile [--images DIR] [--batch 32] [--device cuda] [--no-labels]

Prints the time of a batch whose input shapes the process has not seen yet and of the same batch again
(cuDNN once spent 15-34 s on each new batch's shapes), the GPU's busy time (its kernels' durations
summed) against the batch's wall time, the CUDA runtime calls per batch (kernel launches, copies,
synchronisations) and the costliest operations. Images are decoded as the job decodes them (to about
the working size) and batched as the actor batches them: the first part's images (a GPU part, 256, by
name) sorted by shape group, the first --batch of them profiled, the next warming up (CPU uint8); labels
from the folder's labels.csv unless --no-labels. `--device cpu` runs it here, without the CUDA columns.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from camlabel.pipeline.plan import GPU_PART, shortest_needed
from camlabel.schemas.config import AnnotateSettings
from camlabel.workers.annotator import Annotator, shape_key
from camlabel.workers.decode import decode_reduced
from camlabel.workers.models import load_model
from torch.profiler import ProfilerActivity, profile

DATA = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "stamps-public" / "images"
CUDA_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaStreamSynchronize",
              "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMalloc", "cudaFree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DATA)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-labels", action="store_true")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing profiled.")
        return
    settings = AnnotateSettings()
    names = sorted(p.name for p in args.images.glob("*.jpg"))[: max(GPU_PART, 2 * args.batch)]
    decoded = {n: decode_reduced((args.images / n).read_bytes(), shortest_needed(settings)) for n in names}
    group = {n: shape_key(*decoded[n][0].shape[-2:], settings.input_size) for n in names}
    names = sorted(names, key=group.__getitem__)[: 2 * args.batch]  # as the actor sorts a part
    decoded = [decoded[n] for n in names]
    labels = None
    if not args.no_labels and (args.images.parent / "labels.csv").exists():
        with open(args.images.parent / "labels.csv") as f:
            given = {r["file_name"]: [int(x) for x in r["labels"].split()] for r in csv.DictReader(f)}
        labels = [given[n] for n in names]
    annotator = Annotator(load_model(device=args.device), settings)
    cuda = annotator.loaded.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def once(part: slice):
        """(seconds, result) of one call on the images in `part`."""
        sync()
        start = time.perf_counter()
        images, sizes = [d[0] for d in decoded[part]], [d[1] for d in decoded[part]]
        result = annotator(images, labels[part] if labels else None, sizes)
        sync()
        return time.perf_counter() - start, result

    warm, batch = slice(args.batch, 2 * args.batch), slice(0, args.batch)
    once(warm)  # the first call: CUDA's context, the allocator's pools, libraries loading
    new, _ = once(batch)
    wall, result = once(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        once(batch)
    events = prof.key_averages()
    boxes = sum(len(found) for found in result.labels)
    print(f"{args.device}, precision {annotator.precision}, {args.batch} images "
          f"({'labels' if labels else 'no labels'}) in {len({group[n] for n in names[batch]})} shape groups, "
          f"{boxes} boxes: {new * 1000:.0f} ms a batch of shapes not "
          f"seen before, {wall * 1000:.0f} ms the same batch again, {args.batch / wall:.1f} images/s (unprofiled)")
    if cuda:
        busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type.name == "CUDA")
        profiled_us = max(e.time_range.end for e in prof.events()) - min(e.time_range.start for e in prof.events())
        print(f"GPU busy {busy_us / 1000:.0f} ms of the profiled batch's {profiled_us / 1000:.0f} ms "
              f"({busy_us / max(profiled_us, 1):.0%}, kernels summed)")
        calls = {e.key: e.count for e in events if e.key in CUDA_CALLS}
        print("CUDA runtime calls a batch: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
