"""`camlabel report`: one HTML page to audit a run before anything trains on it.

Per-class counts, box-size and score histograms, the errors, and a gallery of overlays (heatmap, masks,
boxes), lowest confidence first. Reads the run's parts in batches (memory does not grow with the run);
only the gallery's images are decoded again. Everything the page shows is in report.html and the PNGs
beside it in overlays/: no network, no script from elsewhere.
"""

from __future__ import annotations

import hashlib
import heapq
import html
import logging
import re
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from PIL import ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from torchvision.io import encode_png
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ..schemas.tables import ERRORS, IMAGES
from ..workers.decode import DecodeError, decode, read_bytes
from ..workers.preprocess import scaled_size
from .masks import decode_heatmaps
from .store import Location
from .writers import RunError, atomic_write_bytes, check_parts, parts_dataset, read_manifest, read_parts

log = logging.getLogger(__name__)

PAGE_SIDE = 480  # longest side of a gallery picture
NAMED_FROM = 0.05  # boxes scoring under this are drawn thin and grey, unnamed (the run keeps every box)
LABEL_FONT = ImageFont.load_default(size=16)  # Pillow's own scalable font: no font file to find on the host
BINS = 10
# The page may load its own pictures and inline style and script, nothing from anywhere else.
POLICY = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def write_report(run_dir: str | Path, out: Path, gallery: int = 48, chosen: list[str] | None = None) -> Path:
    """Write out/report.html and out/overlays/*.png; returns the page's path."""
    run_dir, out = Location.of(run_dir), Path(out)
    manifest = read_manifest(run_dir)
    check_parts(run_dir)
    chosen = set(chosen or [])
    classes: Counter[str] = Counter()  # every box of a class
    named_classes: Counter[str] = Counter()  # those the pictures name (scoring NAMED_FROM or more)
    sizes, scores = torch.zeros(BINS, dtype=torch.long), torch.zeros(BINS, dtype=torch.long)
    lowest: list[tuple[float, str]] = []  # max-heap by negated confidence: the `gallery` least confident
    named: list[str] = []
    images = 0
    for batch in _batches(run_dir, ["path", "width", "height", "annotations"]):
        for row in batch.to_pylist():
            images += 1
            anns = row["annotations"]
            classes.update(a["class_name"] for a in anns)
            named_classes.update(a["class_name"] for a in anns if a["score"] >= NAMED_FROM)
            if anns:
                box = torch.tensor([a["bbox"] for a in anns])
                relative = (box[:, 2] * box[:, 3] / (row["width"] * row["height"])).sqrt()
                sizes += torch.bincount((relative * BINS).long().clamp(max=BINS - 1), minlength=BINS)
                score = torch.tensor([a["score"] for a in anns])
                scores += torch.bincount((score * BINS).long().clamp(0, BINS - 1), minlength=BINS)
            confidence = image_confidence(anns)
            if Path(row["path"]).name in chosen:
                named.append(row["path"])
            elif gallery > 0:
                item = (-confidence, row["path"])
                heapq.heappush(lowest, item) if len(lowest) < gallery else heapq.heappushpop(lowest, item)
    absent = chosen - {Path(p).name for p in named}
    if absent:
        raise RunError(f"{run_dir}: no image named {', '.join(map(repr, sorted(absent)))} in the run (--images takes "
                       "file names)")
    picked = [p for _, p in sorted(lowest, key=lambda t: (-t[0], t[1]))] + sorted(named)
    figures = _draw_gallery(run_dir, picked, out / "overlays") if picked else []
    errors = read_parts(run_dir / "errors", ERRORS)
    page = _page(manifest, images, classes, named_classes, sizes, scores, figures, errors.slice(0, 100).to_pylist(),
                 errors.num_rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "report.html", page.encode())
    return out / "report.html"


def described(annotation: dict) -> str:
    """An annotation as a person reads it: "moped 0.34 (or disk brake 0.11, Model T 0.05)", with its two best
    runner-ups that score at least a tenth of its own."""
    rivals = [r for r in annotation.get("runner_ups") or [] if r["score"] >= annotation["score"] / 10][:2]
    named = f"{annotation['class_name']} {annotation['score']:.2f}"
    return named + (" (or " + ", ".join(f"{r['class_name']} {r['score']:.2f}" for r in rivals) + ")" if rivals else "")


def image_confidence(annotations: list[dict]) -> float:
    """How sure a run is of an image: the best score of its least sure class (0 when nothing was found). Its
    lowest score would rank every image where a part of a well-found object was boxed apart, weakly, first."""
    best: dict[str, float] = {}
    for a in annotations:
        best[a["class_name"]] = max(best.get(a["class_name"], 0.0), a["score"])
    return min(best.values(), default=0.0)


def found(annotations: list[dict]) -> str:
    """An image's annotations as a person reads them: those scoring NAMED_FROM or more, described, and how many
    weaker ones the run keeps besides ("moped 0.34, tripod 0.12 (+4 weaker)")."""
    shown = [a for a in annotations if a["score"] >= NAMED_FROM]
    weaker = len(annotations) - len(shown)
    return (", ".join(described(a) for a in shown) or "nothing") + (f" (+{weaker} weaker)" if weaker else "")


def _batches(run_dir: Location, columns: list[str], where=None):
    dataset = parts_dataset(run_dir / "annotations", IMAGES)
    yield from dataset.to_batches(columns=columns, filter=where, batch_size=256) if dataset else ()


def _draw_gallery(run_dir: Location, paths: list[str], folder: Path) -> list[dict]:
    """One PNG per image, in the order given: the strongest class map blended in, masks, boxes, labels."""
    rows = {}
    where = pc.field("path").isin(paths)
    for batch in _batches(run_dir, ["path", "width", "height", "annotations", "heatmaps"], where):
        rows.update({r["path"]: r for r in batch.to_pylist()})
    figures = []
    for path in paths:
        row = rows[path]
        name = _overlay_name(path)
        try:
            picture = overlay(decode(read_bytes(path)), row)
        except (OSError, DecodeError) as exc:
            log.warning("cannot draw %s: %s", path, exc)
            figures.append({"row": row, "file": None, "why": str(exc)})
            continue
        atomic_write_bytes(folder / name, encode_png(picture).numpy().tobytes())
        figures.append({"row": row, "file": f"overlays/{name}"})
    return figures


def _overlay_name(path: str) -> str:
    """An image's overlay file: its stem in letters, digits, '_' and '-' only (the page links the file by its
    name, and a '#', '?' or newline in a link cuts or changes it), then a hash of its path (names stay apart)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(path).stem)[:40]
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:10]}.png"


def overlay(image: torch.Tensor, row: dict, side: int = PAGE_SIDE) -> torch.Tensor:
    """uint8 [3,H,W] image and its run row -> uint8 [3,h,w] picture at most `side` on a side (never larger)."""
    height, width = image.shape[-2:]
    h, w = scaled_size(height, width, min(height, width), max_side=min(side, max(height, width)))
    picture = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
    maps, _ = decode_heatmaps(row["heatmaps"])
    if len(maps):
        heat = F.interpolate(maps.float().amax(0)[None, None], size=(h, w), mode="bilinear")[0, 0].clamp(0, 1)
        warm = torch.tensor([255.0, 80.0, 0.0])[:, None, None]
        picture = picture * (1 - 0.5 * heat) + warm * 0.5 * heat
    picture = picture.round().clamp(0, 255).to(torch.uint8)
    anns = row["annotations"]
    if not anns:
        return picture
    rles = [{"size": [row["height"], row["width"]], "counts": a["rle_counts"]} for a in anns]
    masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)[None].float()
    masks = F.interpolate(masks, size=(h, w), mode="nearest")[0] > 0
    picture = draw_segmentation_masks(picture, masks, alpha=0.35, colors="cyan")
    scale = torch.tensor([w / row["width"], h / row["height"]] * 2)
    boxes = torch.tensor([a["bbox"] for a in anns]) * scale
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
    named = [a["score"] >= NAMED_FROM for a in anns]
    weak = [i for i, n in enumerate(named) if not n]
    if weak:  # drawn first, under the named ones: visible, but the picture reads as its objects
        picture = draw_bounding_boxes(picture, boxes[weak], colors="grey", width=1)
    strong = sorted((i for i, n in enumerate(named) if n), key=lambda i: anns[i]["score"])  # best name on top
    if not strong:
        return picture
    picture = draw_bounding_boxes(picture, boxes[strong], colors="yellow", width=2)
    return _label_boxes(picture, boxes[strong], [f"{anns[i]['class_name']} {anns[i]['score']:.2f}" for i in strong])


def _label_boxes(picture: torch.Tensor, boxes: torch.Tensor, labels: list[str]) -> torch.Tensor:
    """Each label black on a yellow strip by its box, kept inside the picture: above the box's top-left corner (or
    just inside where there is no room), else inside it, else at its foot, the first place no better label holds.
    Labels come worst first; the best are placed first and drawn last, on top.

    torchvision draws labels in a fixed 10-pixel bitmap font (a larger one only from a font file the host may
    lack), which no one can read once the picture is scaled down.
    """
    canvas = to_pil_image(picture)
    draw = ImageDraw.Draw(canvas)
    placed: list[tuple[int, int, int, int, str, int, int]] = []  # x, y, width, height, text, its bbox's left, top
    for (x0, y0, _, y1), text in reversed(list(zip(boxes.tolist(), labels, strict=True))):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=LABEL_FONT)
        width, height = right - left + 6, bottom - top + 4
        x = int(min(max(x0, 0), max(canvas.width - width, 0)))
        places = [int(min(max(y, 0), max(canvas.height - height, 0))) for y in
                  (y0 - height if y0 >= height else y0, y0, y1 - height)]
        free = [y for y in places if not any(x < px + pw and px < x + width and y < py + ph and py < y + height
                                             for px, py, pw, ph, *_ in placed)]
        placed.append((x, (free or places)[0], width, height, text, left, top))
    for x, y, width, height, text, left, top in reversed(placed):  # the best last, on top
        draw.rectangle((x, y, x + width - 1, y + height - 1), fill="yellow")
        draw.text((x + 3 - left, y + 2 - top), text, fill="black", font=LABEL_FONT)
    return pil_to_tensor(canvas)


STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
.bar{background:#4a90d9;height:10px;display:inline-block}
.gallery{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:480px}
figcaption{font-size:12px;word-break:break-all}svg{background:#fafafa}
"""

# Each picture must load: a broken one is reported on the console, and the page records how many loaded.
CHECK = """
window.addEventListener('load', () => {
  const pictures = Array.from(document.querySelectorAll('img'));
  const broken = pictures.filter((img) => !img.complete || img.naturalWidth === 0);
  broken.forEach((img) => console.error('picture did not load: ' + img.getAttribute('src')));
  document.body.dataset.picturesLoaded = String(pictures.length - broken.length);
});
"""


def _histogram(counts: torch.Tensor, label: str) -> str:
    top = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * 30 + 5}" y="{100 - 90 * int(c) / top:.1f}" width="24" height="{90 * int(c) / top:.1f}" '
        f'fill="#4a90d9"><title>{i / BINS:.1f}-{(i + 1) / BINS:.1f}: {int(c)}</title></rect>'
        f'<text x="{i * 30 + 5}" y="115" font-size="9">{i / BINS:.1f}</text>'
        for i, c in enumerate(counts))
    return (f'<figure><svg width="{BINS * 30 + 10}" height="120" role="img" aria-label="{label}">{bars}</svg>'
            f"<figcaption>{label}</figcaption></figure>")


def _page(manifest: dict, images: int, classes: Counter, named_classes: Counter, sizes, scores, figures: list[dict],
          errors: list[dict], error_count: int) -> str:
    e = html.escape
    config, model = manifest.get("config", {}), manifest.get("model", {})
    summary = {
        "run": manifest.get("run_dir", ""), "source": manifest.get("source", ""), "images annotated": images,
        "annotations": sum(classes.values()), "errors": error_count, "model": model.get("name", ""),
        "weights sha256": model.get("weights_sha256") or "", "method": config.get("method", ""),
        "input size": config.get("input_size", ""), "status": manifest.get("status", ""),
        "finished": manifest.get("finished", ""),
    }
    top = max(named_classes.values(), default=1)
    by_named = sorted(classes, key=lambda name: (-named_classes[name], -classes[name], name))
    class_rows = "".join(f'<tr><td>{e(name)}</td><td>{named_classes[name]}</td><td>{classes[name]}</td><td>'
                         f'<span class="bar" style="width:{200 * named_classes[name] / top:.0f}px"></span></td></tr>'
                         for name in by_named)
    cards = []
    for fig in figures:
        row = fig["row"]
        caption = found(row["annotations"])
        picture = (f'<img src="{e(fig["file"])}" alt="{e(Path(row["path"]).name)}" loading="eager">' if fig["file"]
                   else f"<p>cannot draw: {e(fig['why'])}</p>")
        cards.append(f"<figure>{picture}<figcaption><b>{e(row['path'])}</b><br>{e(caption)}</figcaption></figure>")
    error_rows = "".join(f"<tr><td>{e(r['path'])}</td><td>{e(r['stage'])}</td><td>{e(r['reason'])}</td></tr>"
                         for r in errors)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>camlabel report</title>
<meta http-equiv="Content-Security-Policy" content="{POLICY}">
<style>{STYLE}</style></head><body>
<h1>camlabel report</h1>
<table>{"".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in summary.items())}</table>
<h2>Annotations per class</h2><table><tr><th>class</th><th>scoring {NAMED_FROM} or more</th><th>all</th><th></th></tr>
{class_rows or "<tr><td>none</td></tr>"}</table>
<h2>Histograms</h2><div class="gallery">
{_histogram(sizes, "box size: sqrt(box area / image area)")}{_histogram(scores, "annotation score")}</div>
<h2>Gallery, lowest confidence first ({len(figures)} images)</h2>
<p>Confidence of an image: the best score of its least sure class (0 when nothing was found). Overlays: the strongest
class map (orange), masks (cyan), boxes (yellow) with class and score; boxes scoring under {NAMED_FROM} thin, grey
and unnamed (counted in the caption as weaker).</p>
<div class="gallery">{"".join(cards)}</div>
<h2>Errors ({error_count})</h2><table><tr><th>path</th><th>stage</th><th>reason</th></tr>{error_rows}</table>
<script>{CHECK}</script>
</body></html>
"""
