"""Heatmap quality figures for the benchmarks (the maps themselves, before any box): MaxBoxAccV2 and PxAP."""

from __future__ import annotations

import torch
import torchvision
from camlabel.workers.boxes import component_stats, connected_components


class MapMeter:
    """MaxBoxAccV2 and PxAP (Choe et al. 2020) of heatmaps, streamed: only per-threshold counters are kept.

    accumulate(heatmap, boxes, mask) per (image, class): heatmap [h,w] in [0,1]; the class's ground-truth
    boxes [N,4] (x, y, w, h) and union mask [h,w], both at the heatmap's resolution. MaxBoxAccV2: at each
    threshold every connected component is boxed; an object is found when one box has IoU >= delta; the
    best threshold's accuracy, averaged over delta in {0.3, 0.5, 0.7}. PxAP: area under the pixel
    precision-recall curve of the map against the mask.
    """

    def __init__(self, thresholds: int = 50, ious: tuple[float, ...] = (0.3, 0.5, 0.7)) -> None:
        self.taus = torch.arange(thresholds) / thresholds  # 0, 0.02, ..., 0.98
        self.ious = torch.tensor(ious)
        self.hits = torch.zeros(len(ious), thresholds)
        self.objects = 0
        self.fg = torch.zeros(thresholds)  # pixels >= tau inside / outside the mask
        self.bg = torch.zeros(thresholds)
        self.fg_total = 0.0

    def accumulate(self, heatmap: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> None:
        heatmap = heatmap.float().cpu()
        above = heatmap[None] >= self.taus[:, None, None]  # [T, h, w]
        mask = mask.bool().cpu()
        self.fg += (above & mask).flatten(1).sum(1)
        self.bg += (above & ~mask).flatten(1).sum(1)
        self.fg_total += float(mask.sum())
        if len(boxes) == 0:
            return
        labels = connected_components(above)
        owner, *_, found = component_stats(labels, labels)  # [M], [M,4] xyxy
        gt = boxes.float().cpu().clone()
        gt[:, 2:] += gt[:, :2]
        iou = torchvision.ops.box_iou(found, gt)  # [M, N]
        best = torch.zeros(len(self.taus), len(gt)).scatter_reduce_(0, owner[:, None].expand_as(iou), iou, "amax")
        self.hits += (best[None] >= self.ious[:, None, None]).sum(2).float()
        self.objects += len(gt)

    def compute(self) -> dict[str, float]:
        accuracy = self.hits / max(self.objects, 1)  # [delta, tau]
        precision = self.fg / (self.fg + self.bg).clamp(min=1)
        recall = self.fg / max(self.fg_total, 1)
        recall_step = torch.cat([recall[:-1] - recall[1:], recall[-1:]])  # recall falls as tau rises
        return {"MaxBoxAccV2": float(accuracy.amax(1).mean()),
                **{f"MaxBoxAcc@{d:.1f}": float(a) for d, a in zip(self.ious.tolist(), accuracy.amax(1), strict=True)},
                "PxAP": float((precision * recall_step).sum())}
