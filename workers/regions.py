"""The classifier looks at found regions: it names each by its crop, keeps one box per object, and judges
whether a box alone holds its object (`fine_box_holds`).

Without image-level labels the classes come from the classifier itself. Its whole-image top classes
rarely name an object that fills a tenth of a cluttered scene, and near-synonyms (tabby, tiger cat,
Egyptian cat) each map the same cat. So the whole image's top classes only propose regions; each region
is then named by the same model looking at a crop around it, where the object fills the frame as in the
classifier's training images, and boxes that cover one object are merged into the best-named one, their
classes kept on it as its runner-ups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, roi_align

CROP_SIZE = 224  # the resolution ImageNet classifiers were trained at
CROP_CONTEXT = 1.25  # a crop's side, as a multiple of the region's longer side: a little context, as in training
SAME_OBJECT_IOU = 0.7  # boxes overlapping more than this cover one object (bench/README.md, "One object, one box")
PART_OVERLAP = 0.8  # a box of one class lying this much inside a better one of its class is a part of it
SURE = 0.7  # fine_box_holds: the whole image's probability of a class above which the classifier judges its boxes

Classify = Callable[[Tensor], Tensor]
"""images [N,3,H,W] -> the classifier's logits [N, classes]: the model, or the annotator's pass of it
(float32, without cuDNN: `Annotator._classify`)."""


@torch.no_grad()
def name_regions(model: Classify, batch: Tensor, boxes: Tensor, owners: Tensor) -> Tensor:
    """Class probabilities [N, classes] of regions boxes [N,4] (x1, y1, x2, y2, input pixels) of images
    owners [N] in `batch` [B,3,H,W] (normalised network input): one square crop per region, centred on
    it, CROP_CONTEXT times its longer side, resampled to CROP_SIZE (roi_align, so the crops never leave
    the device), classified in one pass. Outside the image a crop sees the padding (the dataset mean)."""
    if len(boxes) == 0:
        return batch.new_zeros(0, 0)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True).clamp(min=1) * CROP_CONTEXT / 2
    rois = torch.cat([owners[:, None].to(batch.dtype), centre - half, centre + half], 1)
    crops = roi_align(batch.float(), rois.float(), output_size=CROP_SIZE, aligned=True, sampling_ratio=2)
    return model(crops.contiguous(memory_format=torch.channels_last)).float().softmax(1)


def one_box_per_object(boxes: Tensor, scores: Tensor, classes: Tensor, owners: Tensor) -> Tensor:
    """Indices of the boxes [N,4] (x1, y1, x2, y2) of images owners [N] to keep, best first. A box goes
    when a better-scoring kept box of its image overlaps it by more than SAME_OBJECT_IOU, whatever their
    classes (one object, one box: NMS across classes), or when a better one of its own class holds
    PART_OVERLAP of its area (a part of that object). Across classes a box inside another stays: on
    stamps-public a small object inside a larger box of a wrongly named region is common, and
    suppressing it there cost a sixth of the CorLoc without labels."""
    keep = batched_nms(boxes.float(), scores.float(), owners, SAME_OBJECT_IOU)  # descending score
    kept = boxes[keep].float()
    lo = torch.maximum(kept[:, None, :2], kept[None, :, :2])
    hi = torch.minimum(kept[:, None, 2:], kept[None, :, 2:])
    inside = (hi - lo).clamp(min=0).prod(-1) / (kept[:, 2:] - kept[:, :2]).prod(-1).clamp(min=1e-6)[:, None]
    same = (owners[keep][:, None] == owners[keep][None, :]) & (classes[keep][:, None] == classes[keep][None, :])
    better = torch.ones(len(keep), len(keep), dtype=torch.bool, device=boxes.device).tril(-1)  # j before i
    part = (same & better & (inside > PART_OVERLAP)).any(1)
    return keep[~part]


def folded_into(boxes: Tensor, keep: Tensor, owners: Tensor) -> Tensor:
    """For each box [N] (x1, y1, x2, y2) of images owners [N], the kept box it was folded into by
    `one_box_per_object` (keep: its answer, best first): the best kept box of its image that overlaps it by more
    than SAME_OBJECT_IOU, which suppressed it; -1 for kept boxes and for those no kept box overlaps that much."""
    over = (box_iou(boxes[keep].float(), boxes.float()) > SAME_OBJECT_IOU) & (owners[keep][:, None] == owners)
    over[:, keep] = False
    return torch.where(over.any(0), keep[over.int().argmax(0)], -1)


@torch.no_grad()
def fine_box_holds(model: Classify, small: Tensor, images: Tensor, classes: Tensor, boxes: Tensor) -> Tensor:
    """Whether each class classes[n]'s fine box boxes[n] already holds its object in image images[n], so
    that what a larger box adds is context (a football's pitch, a squirrel's branch): [N] bool.

    small: the batch at half the input's resolution [B,3,H/2,W/2], near the 224 pixels the classifier was
    trained at; boxes [N,4] x1, y1, x2, y2 in its pixels. The classifier sees the whole image and the box
    alone (everything outside it set to the dataset mean, 0): the box holds the object when, alone, it
    keeps at least the class's probability in the whole image, the smallest sufficient region of Dabkowski
    & Gal 2017. Only where the whole image gives the class at least SURE: where the classifier doubts
    the class (most objects pasted on another scene), it cannot judge a box, and its box is not shown alone.
    Two passes: each asked image once, then the boxes of sure classes alone (without labels most classes are
    doubted: 8 of 76 boxes shown alone on 32 stamps-large images, none of 45 on stamps-public's)."""
    distinct, which = images.unique(return_inverse=True)
    seen = small[distinct].contiguous(memory_format=torch.channels_last)
    whole = model(seen).float().softmax(1)[which].gather(1, classes[:, None])[:, 0]
    sure = (whole >= SURE).nonzero()[:, 0]  # one host sync, which indexing by a mask would repeat
    holds = torch.zeros_like(whole, dtype=torch.bool)
    if not len(sure):
        return holds
    h, w = small.shape[-2:]
    rows = torch.arange(h, device=small.device)[None, :, None]
    cols = torch.arange(w, device=small.device)[None, None, :]
    x1, y1, x2, y2 = (side[:, None, None] for side in boxes[sure].unbind(1))
    alone = small[images[sure]] * ((rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2))[:, None]
    kept = model(alone.contiguous(memory_format=torch.channels_last)).float().softmax(1)
    holds[sure] = kept.gather(1, classes[sure, None])[:, 0] >= whole[sure]
    return holds
