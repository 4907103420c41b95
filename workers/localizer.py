"""A classifier turned into a weakly-supervised localizer, and the Grad-CAM guided attention loss.

`GapLocalizer` is the CAM paper's recipe (Zhou et al. 2016, section 2): keep the classifier's
convolutional trunk, drop its head, add one 3x3 convolution (1024 filters, ReLU), global average
pooling and one linear layer. Optionally a channel-spatial attention module sits before the pooling
(GGAM, Xu et al. 2021, arXiv 2101.09666). Either way the layer named `attention` (an identity when
attention is off) is what the pooling averages, so the engine's exact `cam` method applies unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_LAYER = "attention"
EPS = 1e-8


class ChannelSpatialAttention(nn.Module):
    """F -> F * S * M. Channel weights S = sigmoid(MLP(GAP(F))) [B,C]; spatial mask
    M = sigmoid(conv7x7([mean_c, max_c] of F * S)) [B,1,h,w] (CBAM's layout, as GGAM uses)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                 nn.Linear(channels // reduction, channels))
        self.spatial = nn.Conv2d(2, 1, kernel_size=7, padding=3)

    def weighted(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """(attended features [B,C,h,w], channel weights S [B,C])."""
        s = torch.sigmoid(self.mlp(f.mean((2, 3))))
        g = f * s[:, :, None, None]
        m = torch.sigmoid(self.spatial(torch.cat([g.mean(1, keepdim=True), g.amax(1, keepdim=True)], 1)))
        return g * m, s

    def forward(self, f: Tensor) -> Tensor:
        return self.weighted(f)[0]


class GapLocalizer(nn.Module):
    """trunk -> conv3x3(width) + ReLU -> attention (or identity) -> GAP -> linear."""

    def __init__(self, trunk: nn.Module, in_channels: int, num_classes: int, width: int = 1024,
                 attention: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.conv = nn.Sequential(nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU())
        self.attention = ChannelSpatialAttention(width) if attention else nn.Identity()
        self.classifier = nn.Linear(width, num_classes)

    @classmethod
    def from_classifier(cls, model: nn.Module, target_layer: str, num_classes: int, **kwargs) -> GapLocalizer:
        """The classifier's top-level children up to and including `target_layer` become the trunk."""
        children = list(model.named_children())
        names = [n for n, _ in children]
        if target_layer not in names:
            raise ValueError(f"the trunk must end at a top-level child ({', '.join(names)}); got {target_layer!r}")
        trunk = nn.Sequential(OrderedDict(children[: names.index(target_layer) + 1]))
        with torch.no_grad():
            probe = next(model.parameters())
            channels = trunk(torch.zeros(1, 3, 64, 64, device=probe.device, dtype=probe.dtype)).shape[1]
        return cls(trunk, channels, num_classes, **kwargs)

    def forward(self, x: Tensor, details: bool = False):
        """logits [B,N]; with details, (logits, pooled features [B,width,h,w], attention channel weights
        [B,width] or None), which the GGAM loss needs (through forward, so DDP sees the call)."""
        f = self.conv(self.trunk(x))
        if not details:
            return self.classifier(self.attention(f).mean((2, 3)))  # hooks on `attention` fire
        s = None
        if isinstance(self.attention, ChannelSpatialAttention):
            f, s = self.attention.weighted(f)
        return self.classifier(f.mean((2, 3))), f, s


def symmetric_kl(s: Tensor, t: Tensor) -> Tensor:
    """(KL(p || q) + KL(q || p)) / 2 averaged over the batch, where p and q are the positive channel
    weights s, t [B,C] each normalised to sum to one over channels."""
    p = s / s.sum(1, keepdim=True).clamp(min=EPS)
    q = t / t.sum(1, keepdim=True).clamp(min=EPS)
    log_ratio = (p.clamp(min=EPS) / q.clamp(min=EPS)).log()
    return (0.5 * ((p - q) * log_ratio).sum(1)).mean()


def localizer_loss(model: nn.Module, images: Tensor, targets: Tensor, ggam: float = 0.0
                   ) -> tuple[Tensor, Tensor]:
    """(loss, logits) for images [B,3,H,W] and target distributions [B,N] (the labelled classes, each
    row summing to one: cross-entropy with soft targets covers several labels per image).

    With ggam = lambda > 0: CE + lambda * (KL(S || sigmoid(beta)) + KL(sigmoid(beta) || S)) / 2, where S
    are the attention's channel weights and beta the Grad-CAM channel weights of the labelled classes'
    score (its gradient at the attended features, averaged over space), taken as a fixed target.
    """
    logits, features, s = model(images, details=True)  # a GapLocalizer, or DDP around one
    loss = F.cross_entropy(logits, targets)
    if ggam > 0:
        if s is None:
            raise ValueError("the GGAM loss needs a localizer built with attention=True")
        score = (logits * (targets > 0)).sum()
        (grad,) = torch.autograd.grad(score, features, retain_graph=True)
        beta = grad.mean((2, 3)).detach()
        loss = loss + ggam * symmetric_kl(s, torch.sigmoid(beta))
    return loss, logits
