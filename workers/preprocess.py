"""Decoded images to one normalised batch at each image's own aspect ratio, on the model's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTIPLE = 32  # the stride of the coarsest feature map of torchvision's CNNs
SHRINK_FIRST = 4  # images this many times the network's size are first shrunk (to twice it) in uint8


def scaled_size(height: int, width: int, short_side: int, max_side: int | None = None) -> tuple[int, int]:
    """(h, w) with the shorter side at `short_side`, the aspect kept, the longer side capped."""
    scale = short_side / min(height, width)
    if max_side is not None:
        scale = min(scale, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def prepare_batch(
    images: list[Tensor], short_side: int, device: torch.device | str, max_side: int | None = None,
    pad_to: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """uint8 images [3,H_i,W_i] -> (batch [B,3,H,W] normalised, valid [B,2] (h_i, w_i) of each image).

    Each image is resized on `device` so its shorter side is `short_side` (antialiased bilinear), then
    the batch is padded at the bottom/right with the dataset mean (0 after normalisation) to `pad_to`
    (at least as large as every image), or else to the largest size rounded up to a multiple of 32.
    Only the valid region of each map belongs to its image. The batch is channels_last, the layout
    the model's convolutions run fastest in (workers.models).
    """
    if max_side is None:
        max_side = 2 * short_side
    sizes = [scaled_size(img.shape[-2], img.shape[-1], short_side, max_side) for img in images]
    height = -(-max(h for h, _ in sizes) // MULTIPLE) * MULTIPLE
    width = -(-max(w for _, w in sizes) // MULTIPLE) * MULTIPLE
    if pad_to is not None:
        height, width = max(height, pad_to[0]), max(width, pad_to[1])
    batch = torch.empty(len(images), 3, height, width, device=device, memory_format=torch.channels_last).zero_()
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    for i, (img, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        x = img.to(device, non_blocking=True)
        if x.shape[-2] >= SHRINK_FIRST * h and x.shape[-1] >= SHRINK_FIRST * w:  # a huge photo: shrink it in
            x = resize(x, [2 * h, 2 * w], antialias=True)  # uint8 first, never as full-size floats (60 MP: 720 MB)
        x = x.float()[None] / 255
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        batch[i, :, :h, :w] = (x[0] - mean) / std
    return batch, torch.tensor(sizes, device=device)
