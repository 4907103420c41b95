"""The README's picture: the demo report's overlays side by side, small.

    .venv/bin/python scripts/readme_picture.py [runs/demo/report/overlays] [docs/demo.png]

Run `bash scripts/demo.sh` first; every picture is scaled to ROW_HEIGHT pixels and laid out in rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_png, encode_png, read_file

ROW_HEIGHT = 130
PER_ROW = 4
GAP = 4


def contact_sheet(pictures: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [3,H,W] pictures -> one uint8 sheet, PER_ROW a row, each ROW_HEIGHT high, white gaps."""
    scaled = [F.interpolate(p[None].float(), size=(ROW_HEIGHT, max(1, round(p.shape[-1] * ROW_HEIGHT / p.shape[-2]))),
                            mode="bilinear", antialias=True)[0] for p in pictures]
    rows = [scaled[i : i + PER_ROW] for i in range(0, len(scaled), PER_ROW)]
    width = max(sum(p.shape[-1] for p in row) + GAP * (len(row) - 1) for row in rows)
    sheet = torch.full((3, len(rows) * (ROW_HEIGHT + GAP) - GAP, width), 255.0)
    for r, row in enumerate(rows):
        x = 0
        for p in row:
            sheet[:, r * (ROW_HEIGHT + GAP) : r * (ROW_HEIGHT + GAP) + ROW_HEIGHT, x : x + p.shape[-1]] = p
            x += p.shape[-1] + GAP
    return sheet.round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo/report/overlays")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/demo.png")
    pictures = [decode_png(read_file(str(p)), ImageReadMode.RGB) for p in sorted(folder.glob("*.png"))]
    if not pictures:
        raise SystemExit(f"no overlays in {folder}: run `bash scripts/demo.sh` first")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(contact_sheet(pictures), compression_level=9).numpy().tobytes())
    print(out)


if __name__ == "__main__":
    main()
