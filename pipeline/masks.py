"""Semantic label maps for segmentation trainers: one PNG per image, with an ignore band, and their mIoU.

Value 0 is background, class index + 1 a class, and IGNORE the pixels nobody should train on: those
whose map is neither confidently inside (>= high) nor confidently outside (< low), and those two
classes claim with maps closer than `margin` (as IRN and PSA do). 8-bit PNGs (ignore 255) when the
model has at most 254 classes, else 16-bit (ignore 65535).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from .sources import relative_paths
from .store import Location
from .writers import (
    PARTS,
    RunError,
    atomic_write_bytes,
    atomic_write_json,
    check_parts,
    io_reason,
    read_manifest,
    warn_if_unfinished,
)

MASK_BATCH = 16  # rows per mask-writing task: a row's label map is full size


def ignore_value(num_classes: int) -> int:
    return 255 if num_classes <= 254 else 65535


def label_map(maps: torch.Tensor, categories: list[int], height: int, width: int, low: float = 0.3,
              high: float = 0.6, margin: float = 0.1, ignore: int = 255) -> torch.Tensor:
    """maps [K,h,w] in [0,1] of `categories` (class index + 1) -> label map [height, width] (int32).

    With low == high there is no band: every pixel is a class or background.
    """
    if not categories:
        return torch.zeros(height, width, dtype=torch.int32)
    full = F.interpolate(maps[None].float(), size=(height, width), mode="bilinear", align_corners=False)[0]
    values, order = full.topk(min(2, len(categories)), dim=0)
    ids = torch.tensor(categories, dtype=torch.int32)[order[0]]
    labels = torch.full((height, width), ignore, dtype=torch.int32)
    labels = torch.where(values[0] >= high, ids, labels)
    if len(categories) > 1:
        close = (values[1] >= high) & (values[0] - values[1] < margin)
        labels = torch.where(close, ignore, labels)
    return torch.where(values[0] < low, 0, labels)


def decode_heatmaps(records: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """Stored float16 heatmap records -> (maps [K,h,w], category ids). Maps share one size per image."""
    if not records:
        return torch.zeros(0, 1, 1), []
    maps = [torch.from_numpy(np.frombuffer(r["values"], dtype=np.float16).reshape(r["height"], r["width"]).copy())
            for r in records]
    return torch.stack(maps), [r["category_id"] for r in records]


def png_bytes(labels: torch.Tensor, ignore: int, palette: list[int] | None = None) -> bytes:
    array = labels.numpy()
    if ignore == 255:
        image = Image.fromarray(array.astype(np.uint8), mode="P" if palette else "L")
        if palette:
            image.putpalette(palette)
    else:
        image = Image.fromarray(array.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), with white for ignore (255)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[-3:] = [255, 255, 255]
    return palette


def write_label_maps(batch: pa.Table, out: str, source: str, low: float, high: float, ignore: int,
                     palette: list[int] | None) -> dict[str, list[int]]:
    """A batch of annotated rows -> one PNG each under out, named by the image's path below the source with
    `.png` added (`a.jpg.png`): its whole name, so that a.jpg and a.png of one folder never share a PNG."""
    names = relative_paths(batch.column("path").combine_chunks(), source).to_pylist()  # the batch's at once
    for row, relative in zip(batch.to_pylist(), names, strict=True):
        maps, categories = decode_heatmaps(row["heatmaps"])
        labels = label_map(maps, categories, row["height"], row["width"], low, high, ignore=ignore)
        name = Path(out) / f"{relative}.png"
        atomic_write_bytes(name, png_bytes(labels, ignore, palette), durable=False)  # re-made by a rerun
    return {"written": [batch.num_rows]}


def export_masks(run_dir: str | Path, out: Path, low: float = 0.3, high: float = 0.6, palette: bool = True) -> dict:
    """Write one PNG per annotated image (its path below the source, `.png` added), classes.txt and manifest.json.

    Ray tasks read the run's parts and write the PNGs in parallel; nothing per image passes the driver.
    """
    from .job import connect

    run_dir, out = Location.of(run_dir), Path(out)
    manifest = read_manifest(run_dir)
    check_parts(run_dir)
    warn_if_unfinished(run_dir, manifest)
    names = manifest["model"]["class_names"]
    ignore = ignore_value(len(names))
    colours = voc_palette() if palette and ignore == 255 else None
    parts = [p.path for p in (run_dir / "annotations").files(PARTS)]
    written = 0
    if parts:
        connect(None)
        rows = ray.data.read_parquet(parts, filesystem=run_dir.fs)
        rows = rows.select_columns(["path", "width", "height", "heatmaps"])
        try:
            written = rows.map_batches(write_label_maps, batch_size=MASK_BATCH, batch_format="pyarrow", fn_kwargs={
                "out": str(out.resolve()), "source": manifest["source"], "low": low, "high": high, "ignore": ignore,
                "palette": colours}).sum("written")
        except OSError as exc:  # a full disk: every PNG written is whole, a rerun writes them all again
            raise RunError(f"{io_reason(exc)}, reading {run_dir} or writing under {out}; every label map written is "
                           "whole: run it again once mended") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("background\n" + "\n".join(names) + "\n")
    summary = {"run": str(run_dir), "run_manifest": manifest, "images": written, "low": low, "high": high,
               "ignore": ignore, "values": "0 background, class index + 1, ignore"}
    atomic_write_json(out / "manifest.json", summary)
    return summary
