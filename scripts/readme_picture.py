"""The README's picture: the demo run's overlays side by side, drawn at the size they are shown.

    .venv/bin/python scripts/readme_picture.py [runs/demo/run] [docs/demo.png]

Run `bash scripts/demo.sh` first. Each photo is drawn ROW_HEIGHT pixels high by the report's own `overlay`
(shrinking the report's larger pictures would shrink their labels past reading), PER_ROW to a row.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from camlabel.pipeline.report import overlay
from camlabel.pipeline.writers import read_parts
from camlabel.schemas.tables import IMAGES
from camlabel.workers.decode import decode, read_bytes
from PIL import Image

ROW_HEIGHT = 180
PER_ROW = 4
GAP = 4


def contact_sheet(pictures: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3,h,w] pictures of one height -> one uint8 sheet, PER_ROW a row, white gaps between."""
    rows = [pictures[i : i + PER_ROW] for i in range(0, len(pictures), PER_ROW)]
    width = max(sum(p.shape[-1] for p in row) + GAP * (len(row) - 1) for row in rows)
    sheet = torch.full((3, len(rows) * (ROW_HEIGHT + GAP) - GAP, width), 255, dtype=torch.uint8)
    for r, row in enumerate(rows):
        x, top = 0, r * (ROW_HEIGHT + GAP)
        for p in row:
            sheet[:, top : top + p.shape[-2], x : x + p.shape[-1]] = p
            x += p.shape[-1] + GAP
    return sheet


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/run")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/demo.png")
    rows = sorted(read_parts(run / "annotations", IMAGES).to_pylist(), key=lambda r: Path(r["path"]).name)
    if not rows:
        raise SystemExit(f"no annotated images in {run}: run `bash scripts/demo.sh` first")
    sides = [round(ROW_HEIGHT * max(r["width"], r["height"]) / r["height"]) for r in rows]  # each ROW_HEIGHT high
    pictures = [overlay(decode(read_bytes(r["path"])), r, side) for r, side in zip(rows, sides, strict=True)]
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet = Image.fromarray(contact_sheet(pictures).permute(1, 2, 0).numpy())
    # 256 colours, dithered: a third of the bytes in the repository, no difference to the eye
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    print(out)


if __name__ == "__main__":
    main()
