"""Heatmaps to pseudo boxes and masks: thresholds, connected components and instances, batched in torch.

Coordinates: maps come from a padded batch whose image i occupies the top-left `valid[i]` (h, w)
pixels; results are in pixels of each original (upright) image, boxes as COCO [x, y, w, h] floats,
masks as COCO RLE (Fortran order, `counts` as str).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from scipy import ndimage
from torch import Tensor

from .heatmaps import normalise
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

WORK_STRIDE = 4  # thresholds and components are computed at 1/4 of the network input's resolution
COLOUR_PSEUDOCOUNT = 1e-3  # added to every colour cell of the refinement's histograms: unseen colours stay possible
# semantic_spread: affinity = cosine similarity of two cells' features ^ SPREAD_POWER (4 keeps it to cells of
# one kind); the result is SPREAD_MIX of the spread map and the rest of the map itself; the affinity matrix is
# computed over at most SPREAD_CELLS feature cells (16 MB an image), pooled coarser above. Chosen on stamps-large
# and stamps-public, checked on the held-out proxies (bench/README.md).
SPREAD_POWER = 4
SPREAD_MIX = 0.6
SPREAD_CELLS = 2048


@dataclass(frozen=True)
class BoxRule:
    """How a map becomes labels.

    paper: Zhou et al. 2016: keep pixels >= 20% of the max, box the largest connected component,
    mask = every kept pixel. instances: seeded region growing. A component of the pixels above `grow`
    (of the refined map's max) is an instance when it holds a seed, a pixel above `threshold`, and covers
    `min_area`; its mask is the component's pixels above `mask_threshold` (less `wide_drop` when the
    component's box covers over `wide_share` of the image: a wide object's evidence is spread thinner),
    its box that mask's, its score class probability x peak x share of the map's evidence (with a `large`
    rule, x (1 + how far the class's two extents agree) / 2, `_agreement`). Seeds say
    where an object is, the lower extent how far it reaches: a large object's weaker parts join its most
    telling one.

    large: the rule for objects whose box covers over `large_share` of the image, applied to maps from
    smaller input scales (`pseudo_labels`' `coarse`): there a large object shows whole, where the larger
    scales that separate small objects from their surroundings see only its most telling parts.

    crop_scores: with labels, each instance's score is then scaled by what the classifier sees in its crop
    (`workers.annotator.scored_by_crops`); the paper's rule, a baseline, keeps the scores above. A field of
    the rule, so that runs scored otherwise form another series (`pipeline.job.series_of`).

    rival_margin: a mask leaves out the pixels where another class's map of its image (of the same extent) is
    stronger than its own by more than this, and its box is that mask's. Where two objects touch or one hides
    part of another, one's map reaches over the other (mask IoU +0.005 on stamps-large, segm AP50 +0.013 on
    stamps-public; the box cut too, box AP +0.002 and +0.005 on the public sets, up to +0.012 on the held-out
    proxies, bench/README.md). The paper's rule keeps every pixel above its threshold, and classes the model named
    rather than labels are not cut (`workers.annotator.WorkingMaps.labels`).

    closer_look: a box under this share of its image is looked at again, in a view of three times its sides
    mapped at the full input size (`workers.annotator.Annotator.looked_closer`): such a box spans a few of the
    map's cells, and a map that coarse swells over a busy background. Its box and mask then come from the
    view where the view tightens them (other-small box AP 0.470 -> 0.510, mask IoU 0.605 -> 0.646, CorLoc +2
    objects; the public sets have almost no box that small, bench/README.md). 0: none (the paper's rule).

    alike: the fine instances that a class's top coarse instance holds are parts of one object (the class then
    takes its coarse extent) unless the first two are more alike than this: the cosine similarity of the
    classifier's own features (`pseudo_labels`' `features`) summed over each one's box. One object's parts look
    unlike each other (a head, a body: at most 0.75 on the public sets and the held-out proxies); two objects of
    one class side by side look alike (0.86-0.97 for most of other-pairs' pairs): other-pairs' CorLoc 0.394 ->
    0.425 and box AP50 0.538 -> 0.579, no other set moved (bench/README.md).

    revision: how this camlabel makes a rule's labels, raised when that changes with no other field changing
    (2: a box is its mask's, 2026-12-03; 3: a mask holds the cells it encloses, 2026-12-04), so that runs
    made before form another series and are neither resumed nor merged with newer ones (`pipeline.job.series_of`).
    """

    name: str = "instances"
    threshold: float = 0.45
    mask_threshold: float = 0.5
    grow: float | None = None  # extent threshold; None: threshold (no growing)
    min_area: float = 0.002  # of the image, to drop specks
    max_instances: int = 3
    wide_drop: float = 0.0
    wide_share: float = 0.15
    large: BoxRule | None = None
    large_share: float = 0.4
    crop_scores: bool = True
    rival_margin: float = 0.1
    closer_look: float = 0.0
    alike: float = 0.8
    revision: int = 3

    @property
    def extent(self) -> float:
        return self.threshold if self.grow is None else min(self.grow, self.threshold)


PAPER_RULE = BoxRule("paper", threshold=0.2, mask_threshold=0.2, min_area=0.0, max_instances=1, crop_scores=False)
# Seeds at 0.45 of the max; objects reach down to 0.3, large ones (on the coarse maps) to 0.25; masks at
# 0.5, 0.45 for components wider than 15% of the image, 0.4 on the coarse maps. Chosen on the first half of
# stamps-public and of stamps-large, checked on the second (bench/README.md).
LARGE_OBJECT_RULE = BoxRule(threshold=0.45, mask_threshold=0.4, grow=0.25)
RULES = {"paper": PAPER_RULE,
         "instances": BoxRule(threshold=0.45, mask_threshold=0.5, grow=0.3, wide_drop=0.05,
                              large=LARGE_OBJECT_RULE, large_share=0.4, closer_look=0.02)}


@dataclass
class PseudoLabel:
    class_index: int
    bbox: list[float]  # COCO [x, y, w, h], original-image pixels
    score: float
    area: int
    rle: dict  # COCO RLE, counts as str
    runner_ups: list[tuple[int, float]] = field(default_factory=list)  # without labels: (class, score), best first


def affinity_refine(maps: Tensor, image: Tensor, valid: Tensor, radius: int = 2, sigma: float = 0.15,
                    steps: int = 60) -> Tensor:
    """Diffuse maps [B,K,h,w] along colour-coherent regions of image [B,3,h,w] (a random walk).

    Each step replaces a pixel's value by the mean of its (2r+1)^2 neighbours, weighted by
    exp(-|c_i - c_j|^2 / 2 sigma^2) on colours: evidence spreads over the object and stops at its edges,
    as in the random-walk refinement of Ahn & Kwak 2018 (with colour instead of learned affinities).
    valid [B,h,w] masks padding out of the walk.
    """
    b, k, h, w = maps.shape
    window = 2 * radius + 1

    def neighbours(x: Tensor) -> Tensor:  # [N,C,h,w] -> [N,C,window^2,h,w]
        n, c = x.shape[:2]
        return F.unfold(x, window, padding=radius).view(n, c, window * window, h, w)
    colour = neighbours(image.float())
    distance = (colour - image.float()[:, :, None]).pow(2).sum(1)  # [B,window^2,h,w]
    weights = torch.exp(-distance / (2 * sigma**2)) * neighbours(valid[:, None].float())[:, 0]
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-7)
    spread = spread_unfolded if maps.is_cuda else spread_shifted
    for _ in range(steps):
        maps = spread(maps, weights, radius)
    return maps


def spread_shifted(maps: Tensor, weights: Tensor, radius: int) -> Tensor:
    """One walk step on the CPU: the window's shifted views added up in place, no window^2-sized copy of
    the maps (6x faster than unfolding them on a CPU core, the same sums; 25 small ops a step)."""
    h, w = maps.shape[-2:]
    window = 2 * radius + 1
    padded = F.pad(maps, (radius, radius, radius, radius))
    spread = torch.zeros_like(maps)
    for j in range(window * window):
        dy, dx = divmod(j, window)
        spread.addcmul_(padded[:, :, dy : dy + h, dx : dx + w], weights[:, None, j])
    return spread


def spread_unfolded(maps: Tensor, weights: Tensor, radius: int) -> Tensor:
    """One walk step on a GPU: the same sums as `spread_shifted` in three large ops (unfold, multiply,
    sum) instead of 25 small launches; the window^2 copy is cheap on the device."""
    b, k, h, w = maps.shape
    window = 2 * radius + 1
    cells = F.unfold(maps.reshape(b * k, 1, h, w), window, padding=radius).view(b, k, window * window, h, w)
    return (cells * weights[:, None]).sum(2)


def semantic_spread(maps: Tensor, features: Tensor, inside: Tensor, set_size: int | None = None) -> Tensor:
    """Maps [B,K,h,w] mixed with their spread along the classifier's own features [B,C,hf,wf] (stride 16).

    Each feature cell takes the mean of every cell's evidence, weighted by relu(cosine similarity of their
    features)^SPREAD_POWER: one step of a random walk on the network's features (Ahn & Kwak 2018 walk
    learned affinities; these come free with the pass). A CAM peaks on an object's most telling part (a
    dog's head); its other parts (the body) share that part's mid-level features and not the background's,
    so evidence reaches the whole object before the colour refinement fits it to edges. inside [B,h,w]:
    the image's cells (not padding), which alone give and keep evidence.

    An image's classes compete: where another map of its set (`set_size` consecutive maps, default all K:
    one image's classes, at one set of scales) holds more evidence than a map's own, that map's spread is
    cut by the difference. Evidence reaches its object's other parts, not a neighbouring object of a like
    kind that another class explains (a lemon's beside an orange).
    """
    b, k, h, w = maps.shape
    hf, wf = features.shape[-2:]
    pool = max(1, math.ceil(math.sqrt(hf * wf / SPREAD_CELLS)))
    grid = (-(-hf // pool), -(-wf // pool))
    inside = inside[:, None].float()
    evidence = F.adaptive_avg_pool2d(maps * inside, grid).flatten(2)  # [B,K,N]
    giving = F.adaptive_avg_pool2d(inside, grid).flatten(1) > 0  # [B,N] cells that hold some image
    unit = F.normalize(F.adaptive_avg_pool2d(features.float(), grid).flatten(2), dim=1)  # [B,C,N]
    affinity = torch.bmm(unit.transpose(1, 2), unit).clamp(min=0).pow(SPREAD_POWER) * giving[:, None]
    affinity = affinity / affinity.sum(2, keepdim=True).clamp(min=1e-7)
    spread = torch.bmm(evidence, affinity.transpose(1, 2)).view(b, k, *grid)
    spread = F.interpolate(spread, size=(h, w), mode="bilinear", align_corners=False) * inside
    own = normalise(maps * inside)
    return normalise(SPREAD_MIX * normalise(spread) * (1 - stronger_rival(own, set_size or k)) + (1 - SPREAD_MIX) * own)


def stronger_rival(maps: Tensor, set_size: int) -> Tensor:
    """By how much the strongest other map of each map's set exceeds it, per pixel (0 where none does):
    maps [B,K,h,w] in sets of `set_size` consecutive maps."""
    b, k, h, w = maps.shape
    if set_size < 2:
        return torch.zeros_like(maps)
    sets = maps.view(b, k // set_size, set_size, h, w)
    top2 = sets.topk(2, dim=2).values  # a map that is its set's max competes with the runner-up
    rival = torch.where(sets >= top2[:, :, :1], top2[:, :, 1:], top2[:, :, :1])
    return (rival - sets).clamp(min=0).view(b, k, h, w)


def colour_refine(maps: Tensor, image: Tensor, valid: Tensor, bins: int = 16, iterations: int = 2) -> Tensor:
    """Sharpen maps [B,K,h,w] with a colour model of the object learnt from the map itself.

    Colour histograms of foreground (weighted by the map) and background (by 1 - map) are built per map
    over `bins`^3 RGB cells of image [B,3,h,w] (normalised network input); each pixel's map value becomes
    the posterior map * p(c|fg) / (map * p(c|fg) + (1 - map) * p(c|bg)), as GrabCut's colour term does.
    """
    b, k, h, w = maps.shape
    rgb = image.float() * torch.tensor(IMAGENET_STD, device=image.device)[:, None, None]
    rgb = rgb + torch.tensor(IMAGENET_MEAN, device=image.device)[:, None, None]
    cell = (rgb.clamp(0, 1 - 1e-6) * bins).long()
    index = ((cell[:, 0] * bins + cell[:, 1]) * bins + cell[:, 2]).flatten(1)  # [B, hw]
    index = index[:, None].expand(b, k, h * w)
    inside = valid.flatten(1)[:, None].float()
    prior = maps.flatten(2)
    for _ in range(iterations):
        fg = torch.zeros(b, k, bins**3, device=maps.device).scatter_add_(2, index, prior * inside)
        bg = torch.zeros(b, k, bins**3, device=maps.device).scatter_add_(2, index, (1 - prior) * inside)
        fg = (fg + COLOUR_PSEUDOCOUNT) / (fg.sum(2, keepdim=True) + COLOUR_PSEUDOCOUNT * bins**3)
        bg = (bg + COLOUR_PSEUDOCOUNT) / (bg.sum(2, keepdim=True) + COLOUR_PSEUDOCOUNT * bins**3)
        pf, pb = fg.gather(2, index), bg.gather(2, index)
        prior = maps.flatten(2) * pf / (maps.flatten(2) * pf + (1 - maps.flatten(2)) * pb + 1e-7)
    return prior.view(b, k, h, w) * valid[:, None]


def connected_components(mask: Tensor) -> Tensor:
    """Label 8-connected components of masks [N,H,W] (bool), all at once.

    Returns labels [N,H,W] (int64): 0 on background, otherwise 1 + the largest flat index of the
    component's pixels, so ids are unique within a map and do not depend on how they were found.
    On the CPU scipy labels the whole stack in one C call; on a GPU the maps stay on the device
    (`propagate_components`).
    """
    if mask.device.type != "cpu":
        return propagate_components(mask)
    n, h, w = mask.shape
    if mask.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.long)
    within_map = np.zeros((3, 3, 3), bool)
    within_map[1] = True  # 8-connected inside a map, never linked to the next map
    found, count = ndimage.label(mask.numpy(), structure=within_map)
    found = torch.from_numpy(found).long().view(n, h * w)
    ids = torch.arange(1, h * w + 1).expand(n, -1)
    largest = torch.zeros(count + 1, dtype=torch.long).scatter_reduce(0, found.flatten(), ids.flatten(), "amax")
    largest[0] = 0
    return largest[found].view(n, h, w)


def propagate_components(mask: Tensor) -> Tensor:
    """`connected_components` by max-propagation on the mask's device, with pointer jumping: a label
    is the id of a pixel of the same component, so taking that pixel's label too doubles how far
    labels travel each round (rounds grow with the log of a component's length)."""
    n, h, w = mask.shape
    if mask.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.long)
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w)
    keep = mask[:, None].float()
    labels = ids * keep
    while True:
        previous = labels
        labels = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        flat = labels.view(n, h * w)
        jumped = flat.gather(1, (flat.long() - 1).clamp(min=0)).view_as(labels) * keep
        labels = torch.maximum(labels, jumped)
        if torch.equal(labels, previous):
            return labels[:, 0].long()


def component_stats(labels: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per component of labels [N,H,W]: (map index, label id, area in pixels, peak and sum of `values`,
    box [M,4] as x1, y1, x2, y2 pixel edges).

    Flat tensors over every component of every map; vectorised with unique + scatter.
    """
    n, h, w = labels.shape
    flat = labels.flatten(1)
    key = torch.arange(n, device=labels.device)[:, None] * (flat.shape[1] + 1) + flat
    fg = flat > 0
    keys, inverse = torch.unique(key[fg], return_inverse=True)
    inside = values.flatten(1)[fg].float()
    zeros = torch.zeros(len(keys), device=labels.device)
    area = zeros.scatter_add(0, inverse, torch.ones_like(inside))
    peak = zeros.scatter_reduce(0, inverse, inside, reduce="amax", include_self=False)
    mass = zeros.scatter_add(0, inverse, inside)
    position = torch.arange(h * w, device=labels.device).expand(n, -1)[fg]
    x, y = (position % w).float(), (position // w).float()
    box = torch.stack([zeros.scatter_reduce(0, inverse, x, reduce="amin", include_self=False),
                       zeros.scatter_reduce(0, inverse, y, reduce="amin", include_self=False),
                       zeros.scatter_reduce(0, inverse, x, reduce="amax", include_self=False) + 1,
                       zeros.scatter_reduce(0, inverse, y, reduce="amax", include_self=False) + 1], 1)
    return keys // (flat.shape[1] + 1), keys % (flat.shape[1] + 1), area, peak, mass, box


def instance_confidence(probability: Tensor, peak: Tensor, share: Tensor) -> Tensor:
    """Score of an instance: P(class present) x its peak x its share of the map's evidence.

    A compact component holding most of the map's mass is far more often a whole, correctly boxed object
    than one of several fragments; ranking by it lifted box AP50 on held-apart benchmark images.
    """
    return probability * peak * share


def _select(rule: BoxRule, owner: Tensor, area: Tensor, peak: Tensor, cells: Tensor, seed: Tensor) -> Tensor:
    """Indices of kept components, ordered by owner map then descending rank; seed: each component's
    seed threshold."""
    if rule.name == "paper":
        rank = area
        keep = torch.ones_like(area, dtype=torch.bool)
    else:
        rank = peak * (1 + area / cells[owner])  # peak first; area breaks near-ties
        keep = (area >= rule.min_area * cells[owner]) & (peak >= seed)
    order = torch.argsort(rank, descending=True, stable=True)
    order = order[keep[order]]
    order = order[torch.argsort(owner[order], stable=True)]
    # position of each component among its map's kept ones
    first = torch.searchsorted(owner[order], owner[order], right=False)
    position = torch.arange(len(order), device=owner.device) - first
    return order[position < rule.max_instances]


def working_maps(maps: Tensor, valid: Tensor, input_size: tuple[int, int], guide: Tensor | None = None,
                 features: Tensor | None = None, set_size: int | None = None) -> Tensor:
    """Maps [B,K,h,w] of a padded batch -> [B,K,H/4,W/4] at the working resolution, 0 on padding.

    valid [B,2]: each image's (h, w) inside the padded network input of `input_size` (H, W).
    features: the classifier's features at stride 16 [B,C,H/16,W/16]; when given, evidence first spreads
    to the cells that share the features of where it is (`semantic_spread`): a large object's weaker parts;
    the maps of a set (`set_size` consecutive maps, default all) compete for it.
    guide: the network input [B,3,H,W]; when given, maps are refined with the image's colours: a colour
    model of object vs background (`colour_refine`), then a random walk along colour edges
    (`affinity_refine`). This is what lifts CAM's blobs to object-shaped masks and tight boxes.
    """
    height, width = input_size
    size = (height // WORK_STRIDE, width // WORK_STRIDE)
    work = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    inside = _inside(valid, size)
    if features is not None:
        work = semantic_spread(work, features, inside, set_size)
    work = work * inside[:, None]
    if guide is not None:
        colour = F.interpolate(guide, size=size, mode="area")
        work = normalise(affinity_refine(colour_refine(work, colour, inside), colour, inside))
    return work


def _inside(valid: Tensor, size: tuple[int, int]) -> Tensor:
    rows = torch.arange(size[0], device=valid.device)[None, :, None]
    cols = torch.arange(size[1], device=valid.device)[None, None, :]
    return (rows < valid[:, 0, None, None] / WORK_STRIDE) & (cols < valid[:, 1, None, None] / WORK_STRIDE)


def pseudo_labels(
    work: Tensor,
    classes: Tensor,
    scores: Tensor,
    valid: Tensor,
    input_size: tuple[int, int],
    original_sizes: list[tuple[int, int]],
    rule: BoxRule = RULES["instances"],
    coarse: Tensor | None = None,
    judge: Judge | None = None,
    features: Tensor | None = None,
) -> list[list[PseudoLabel]]:
    """Working maps [B,K,H/4,W/4] (from `working_maps`), classes/scores [B,K] -> each image's labels.

    scores: the probability that each class is present (1 for classes a person labelled).
    valid [B,2]: each image's (h, w) inside the padded network input of `input_size` (H, W).
    original_sizes: each image's (height, width).
    coarse: the same classes' maps from smaller input scales. With a rule that has a `large` rule, a class
    with a coarse instance (under `rule.large`) whose box covers over `rule.large_share` of the image takes
    its instances from `coarse`, every other class from `work` (`_large_objects`). judge: asked, for each
    class about to take its coarse extent whose top fine box differs from its top coarse one, whether that
    fine box already holds the object (see `Judge`); a class it says so of keeps its fine instances. features:
    the classifier's features of the batch at a coarser stride [B,C,h,w] (`working_maps`'), which tell two
    objects of a class from one object's parts (`BoxRule.alike`); without them, held instances are parts. With
    `coarse`, a class's scores are multiplied by (1 + the IoU of its top boxes on the two extents) / 2.
    """
    b, k = classes.shape
    rules = [rule] if coarse is None or rule.large is None else [rule, rule.large]
    maps = work if len(rules) == 1 else torch.cat([work, coarse], 1)
    m = maps.shape[1]  # k maps per image, or 2k: first work's, then coarse's

    def per_map(field: str) -> Tensor:  # [B*m], each map's rule's value
        return torch.tensor([getattr(r, field) for r in rules], device=work.device).repeat_interleave(k).repeat(b)

    live = (classes >= 0).repeat(1, len(rules)).flatten()
    kept_pixels = (maps.flatten(0, 1) >= per_map("extent")[:, None, None]) & live[:, None, None]
    labels = torch.zeros_like(kept_pixels, dtype=torch.long)
    some = kept_pixels.flatten(1).any(1).nonzero()[:, 0]  # only maps with pixels to label (most are padding)
    labels[some] = connected_components(kept_pixels[some])
    owner, ids, area, peak, mass, box = component_stats(labels, maps.flatten(0, 1))
    cells = (valid[:, 0] * valid[:, 1] / WORK_STRIDE**2).float().repeat_interleave(m)
    share = mass / maps.flatten(2).sum(-1).flatten()[owner].clamp(min=1e-7)  # of the map's whole evidence
    confidence = instance_confidence(scores.repeat(1, len(rules)).flatten()[owner].float(), peak, share)
    kept = _select(rule, owner, area, peak, cells, per_map("threshold")[owner])
    wider = (box[:, 2:] - box[:, :2]).prod(1) > per_map("wide_share")[owner] * cells[owner]
    mask_threshold = per_map("mask_threshold")[owner] - wider * per_map("wide_drop")[owner]  # per component
    if len(rules) == 2:
        kept, confidence = _extent_chosen(maps, labels, kept, owner, ids, box, cells, confidence, mask_threshold,
                                          classes, rule, judge, features)
    return _labels_of(maps, labels, kept, owner, ids, confidence, mask_threshold, classes, valid, input_size,
                      original_sizes, rule)


def _extent_chosen(maps: Tensor, labels: Tensor, kept: Tensor, owner: Tensor, ids: Tensor, box: Tensor, cells: Tensor,
                   confidence: Tensor, mask_threshold: Tensor, classes: Tensor, rule: BoxRule, judge: Judge | None,
                   features: Tensor | None) -> tuple[Tensor, Tensor]:
    """`pseudo_labels`' kept instances of both extents (maps [B,2K,h,w]: the fine maps, then the coarse) cut to
    each class's chosen one, and every component's confidence times the two extents' agreement."""
    b, k = classes.shape
    m = 2 * k
    mine = owner[kept]
    top = _tops(mine, confidence[kept])
    top_box, has_top = _top_boxes(maps.flatten(0, 1), labels, owner, ids, mask_threshold, kept[top])
    looks = None if features is None else _looks(features, owner[kept] // m, box[kept], labels.shape[-1])
    large = _large_objects(kept, top, owner, box, cells, rule.large_share, b, k, looks, rule.alike)
    if judge is not None:
        large = _judged(large, judge, classes, top_box, has_top)
    # a class's score rises with how far its two extents' top boxes agree: a re-ranking across classes and
    # images that changes no class's top instance (without labels, one box per object across classes follows
    # scores, so there it can change which box an object keeps)
    confidence = confidence * (1 + _agreement(top_box, has_top, b, k)[owner]) / 2
    # a class's instances come from its coarse maps when it is a large object, else from its fine ones
    return kept[(mine % m >= k) == large.view(b, 1, k).expand(b, 2, k).flatten()[mine]], confidence


def _labels_of(maps: Tensor, labels: Tensor, kept: Tensor, owner: Tensor, ids: Tensor, confidence: Tensor,
               mask_threshold: Tensor, classes: Tensor, valid: Tensor, input_size: tuple[int, int],
               original_sizes: list[tuple[int, int]], rule: BoxRule) -> list[list[PseudoLabel]]:
    """`pseudo_labels`' kept instances (components of maps [B,m,h,w], m a multiple of the K classes) as each
    image's labels: masks sampled at the original size, a batch's masks encoded together."""
    b, k = classes.shape
    m = maps.shape[1]
    mask_thresholds = mask_threshold[kept]
    # what the host needs of the batch, in one copy each: not one per image or instance (GPU syncs)
    owner, ids, confidence = owner[kept].tolist(), ids[kept], confidence[kept].tolist()
    class_of, valid_hw = classes.tolist(), valid.tolist()
    results: list[list[PseudoLabel]] = [[] for _ in range(b)]
    by_image: dict[int, list[int]] = {}
    for j, o in enumerate(owner):
        by_image.setdefault(o // m, []).append(j)
    pending: list[Sampled] = []  # masks of several images, copied to the host together
    # the cells each map's masks may hold (`rival_margin`); None: nothing to cut (one class, the paper's rule,
    # or no margin)
    cut = k > 1 and rule.name != "paper" and math.isfinite(rule.rival_margin)
    owned = stronger_rival(maps, k) <= rule.rival_margin if cut else None
    for i, members in by_image.items():
        ranks = [owner[j] % m for j in members]
        names, scores_i = [class_of[i][r % k] for r in ranks], [confidence[j] for j in members]
        need = original_sizes[i][0] * original_sizes[i][1] * len(members)
        if sum(s.box_masks.numel() for s in pending) + need > MASK_BUDGET:
            _encode(pending, results)
        for region, masks, chunk in masks_at_original_size(
                maps[i], labels.view(b, m, *labels.shape[-2:])[i], valid_hw[i], input_size, original_sizes[i],
                ranks, ids[members], mask_thresholds[members], None if owned is None else owned[i]):
            # a box is its instance's mask's; the paper's rule boxes the largest component but keeps every pixel
            # above threshold as mask
            pending.append(Sampled(i, masks, region if rule.name == "paper" else masks, names[chunk],
                                   scores_i[chunk]))
            if need > MASK_BUDGET:  # a photo too large for one go: its chunks go one at a time
                _encode(pending, results)
    _encode(pending, results)
    return results


def _large_objects(kept: Tensor, top: Tensor, owner: Tensor, box: Tensor, cells: Tensor, large_share: float,
                   b: int, k: int, looks: Tensor | None = None, alike: float = 1.0) -> Tensor:
    """Which classes [B*K] take their coarse instances: those with a large object, a coarse instance whose box
    covers over `large_share` of the image (cells: each map's image area), or whose top coarse instance holds
    (half or more of the box of) two or more of the class's fine instances, which are then parts of one
    object, unless the first two look alike (the cosine of their `looks` [len(kept), C] over `alike`): then
    they are two objects.
    kept: the kept components (indices, ordered by owner map, over B images x 2k maps: k fine, then k coarse);
    top [len(kept)]: which is its map's top instance, its best by score (`_tops`)."""
    mine = owner[kept]
    image, slot = mine // (2 * k), mine % (2 * k)
    coarse = slot >= k
    cls = image * k + slot % k  # the (image, class) each component belongs to
    leader = top & coarse
    top_box = torch.zeros(b * k, 4, device=box.device)
    top_box[cls[leader]] = box[kept[leader]]
    # the largest coarse instance's share of the image: a large object's brightest coarse component may be a
    # speck (a bird's foot) beside its body
    every = (box[kept, 2:] - box[kept, :2]).prod(1) / cells[mine]
    share = torch.zeros(b * k, device=box.device).scatter_reduce(0, cls[coarse], every[coarse], "amax")
    lo = torch.maximum(box[kept, :2], top_box[cls, :2])
    hi = torch.minimum(box[kept, 2:], top_box[cls, 2:])
    held = (hi - lo).clamp(min=0).prod(1) >= 0.5 * (box[kept, 2:] - box[kept, :2]).prod(1)
    parts = torch.zeros(b * k, device=box.device).index_add_(0, cls[~coarse], held[~coarse].float())
    if looks is not None:
        # the class's first two held fine instances (kept orders a map's instances by rank): two alike are
        # two objects of the class, not parts of one
        ordered = (held & ~coarse).nonzero()[:, 0]
        position = torch.arange(len(ordered), device=box.device) - torch.searchsorted(cls[ordered], cls[ordered])
        second = ordered[position == 1]
        first = ordered[torch.searchsorted(cls[ordered], cls[second])]
        two_objects = (looks[first] * looks[second]).sum(1) > alike
        parts[cls[second]] = torch.where(two_objects, 0.0, parts[cls[second]])
    return (share > large_share) | (parts >= 2)


def _looks(features: Tensor, image: Tensor, box: Tensor, width: int) -> Tensor:
    """What each box looks like to the classifier [N,C]: its image's features [B,C,h,w] summed over the box (x1,
    y1, x2, y2 in cells of a grid `width` wide; the features' cells are coarser, and a box takes every one it
    touches), to unit length, so that a product of two is their cosine similarity."""
    step = width / features.shape[-1]
    table = F.pad(features.float().cumsum(-1).cumsum(-2), (1, 0, 1, 0))  # summed-area table [B,C,h+1,w+1]
    lo = (box[:, :2] / step).floor().long()
    hi = torch.maximum((box[:, 2:] / step).ceil().long(), lo + 1)
    hi = torch.minimum(hi, torch.tensor([features.shape[-1], features.shape[-2]], device=box.device))
    (x1, y1), (x2, y2) = lo.T, hi.T
    summed = table[image, :, y2, x2] - table[image, :, y1, x2] - table[image, :, y2, x1] + table[image, :, y1, x1]
    return F.normalize(summed, dim=1)


def _judged(large: Tensor, judge: Judge, classes: Tensor, top_box: Tensor, has_top: Tensor) -> Tensor:
    """`large` [B*K], less the classes the judge finds already held by their top fine box. Only a class about
    to take its coarse extent whose two top boxes differ is asked: one host sync for the batch. top_box
    [B*2k,4], has_top [B*2k]: from `_top_boxes`."""
    b, k = classes.shape
    fine, coarse = top_box.view(b, 2, k, 4).unbind(1)
    asked = (large & has_top.view(b, 2, k).all(1).flatten() & (fine != coarse).any(-1).flatten()).nonzero()[:, 0]
    if not len(asked):
        return large
    large = large.clone()
    large[asked] &= ~judge(asked // k, classes.flatten()[asked], fine.reshape(-1, 4)[asked])
    return large


def _tops(mine: Tensor, confidence: Tensor) -> Tensor:
    """Which of the components (each of map `mine`, scored `confidence`) is its map's best by score: [N] bool."""
    by_score = torch.argsort(confidence, descending=True, stable=True)
    by_score = by_score[torch.argsort(mine[by_score], stable=True)]
    first = torch.ones_like(by_score, dtype=torch.bool)
    first[1:] = mine[by_score[1:]] != mine[by_score[:-1]]
    top = torch.zeros_like(mine, dtype=torch.bool)
    top[by_score[first]] = True
    return top


def _agreement(top_box: Tensor, has_top: Tensor, b: int, k: int) -> Tensor:
    """How far a class's two extents agree, per map [B*2k] (k fine, then k coarse, per image; a class's two
    maps get the same value): the IoU of its top instance's box on each, 0 where either has none. top_box
    [B*2k,4] (x1, y1, x2, y2), has_top [B*2k]: from `_top_boxes`. Where the larger and the smaller scales put
    a class's object in one place, its box is more often right (bench/README.md)."""
    fine, coarse = top_box.view(b, 2, k, 4).unbind(1)
    inter = (torch.minimum(fine[..., 2:], coarse[..., 2:]) - torch.maximum(fine[..., :2], coarse[..., :2])).clamp(min=0)
    inter = inter.prod(-1)
    union = (fine[..., 2:] - fine[..., :2]).prod(-1) + (coarse[..., 2:] - coarse[..., :2]).prod(-1) - inter
    iou = torch.where(has_top.view(b, 2, k).all(1), inter / union.clamp(min=1e-7), 0.0)  # [B,k]
    return iou[:, None].expand(b, 2, k).flatten()


def _top_boxes(maps: Tensor, labels: Tensor, owner: Tensor, ids: Tensor, mask_threshold: Tensor,
               tops: Tensor) -> tuple[Tensor, Tensor]:
    """Each map's top instance's box, the box of its mask before another class's stronger cells are cut out
    (the component's pixels above its mask threshold; cut here too, no figure of either public set moved),
    [B*m,4] x1, y1, x2, y2 in working cells, and whether the map has one [B*m]. maps, labels
    [B*m,h,w]; owner, ids, mask_threshold [M]; tops: the top instances' component indices. A seed under the
    mask threshold can leave a top instance's mask empty: then its map has no box."""
    which = owner[tops]
    masks = (maps[which] >= mask_threshold[tops, None, None]) & (labels[which] == ids[tops, None, None])
    top_box = torch.zeros(len(maps), 4, device=maps.device)
    has_top = torch.zeros(len(maps), dtype=torch.bool, device=maps.device)
    top_box[which], has_top[which] = _corners(_boxes(masks)), masks.flatten(1).any(1)
    return top_box, has_top


Judge = Callable[[Tensor, Tensor, Tensor], Tensor]
"""judge(images [N], classes [N], fine boxes [N,4]) -> [N] bool: whether each class's top fine box (x1, y1,
x2, y2 in working cells) already holds its object in that image, so that what its coarse instances add is
context (`workers.regions.fine_box_holds`)."""


MASK_BUDGET = 1 << 26  # instance-pixels sampled at once at original size (~400 MB): a 60 MP photo goes one
# instance at a time, a 1 MP one all at once


def _sampling_weights(original: int, valid: int, padded: int, cells: int, device) -> tuple[Tensor, Tensor]:
    """Along one axis: bilinear weights [original, cells] (grid_sample's, align_corners False, zero
    padding) and the cell [original] holding each original pixel's centre, on a grid of `cells` over the
    padded input (the image fills `valid` of `padded` pixels)."""
    centre = (torch.arange(original, device=device, dtype=torch.float64) + 0.5) * (valid / original)
    u = centre / padded * cells - 0.5
    low = u.floor()
    frac = (u - low).float()
    weights = torch.zeros(original, cells + 2, device=device)  # one spare cell each side: zero padding
    rows = torch.arange(original, device=device)
    weights[rows, low.long() + 1] = 1 - frac
    weights[rows, low.long() + 2] += frac
    nearest = (centre / padded * cells).floor().long().clamp(0, cells - 1)
    return weights[:, 1:-1], nearest


def masks_at_original_size(map_i: Tensor, labels_i: Tensor, valid_i: list[int], input_size: tuple[int, int],
                           original: tuple[int, int], ranks: list[int], ids: Tensor, thresholds: Tensor,
                           owned_i: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor, slice]]:
    """Image i's chosen maps and components at every original pixel, in chunks that fit MASK_BUDGET:
    yields (thresholded-map masks; kept masks, the component's pixels and the cells they enclose (`enclosed`),
    in its map's cells of owned_i [m,h,w] bool, all of them when it is None; which instances), each mask
    [c, h0, w0] bool. Separable sampling (two small matrix products, one gather) instead of a full-size
    sampling grid."""
    h0, w0 = original
    vh, vw = valid_i
    wy, iy = _sampling_weights(h0, vh, input_size[0], map_i.shape[-2], map_i.device)
    wx, ix = _sampling_weights(w0, vw, input_size[1], map_i.shape[-1], map_i.device)
    step = max(1, MASK_BUDGET // max(h0 * w0, 1))
    for start in range(0, len(ranks), step):
        chunk = slice(start, start + step)
        rank = torch.tensor(ranks[chunk], device=map_i.device)
        values = wy @ map_i[rank].float() @ wx.T  # [c, h0, w0]
        region = values >= thresholds[chunk, None, None]
        del values
        in_component = labels_i[rank] == ids[chunk, None, None]
        component = region & in_component[:, iy][:, :, ix]  # compare, then gather
        # an object is solid: where its map dips under the threshold inside the mask, the mask still holds it
        # (another class's stronger cells are cut after, so an object in front still leaves its hole)
        component |= enclosed(in_component & (map_i[rank] >= thresholds[chunk, None, None]))[:, iy][:, :, ix]
        yield region, component if owned_i is None else component & owned_i[rank][:, iy][:, :, ix], chunk


def enclosed(mask: Tensor) -> Tensor:
    """The cells of masks [N,h,w] outside the mask that it encloses (its holes): those not joined to the grid's
    border through other cells outside it."""
    outside = F.pad(~mask, (1, 1, 1, 1), value=True)
    labels = connected_components(outside)
    return (outside & (labels != labels[:, :1, :1]))[:, 1:-1, 1:-1]


@dataclass
class Sampled:
    """Instances of image `image` at its original size, to encode: box_masks [c,H,W] give the boxes,
    masks [c,H,W] the RLE masks and areas."""

    image: int
    box_masks: Tensor
    masks: Tensor
    class_indices: list[int]
    scores: list[float]


def _encode(pending: list[Sampled], results: list[list[PseudoLabel]]) -> None:
    """Append every pending instance that has pixels to its image's labels (boxes: box_masks' tight boxes;
    masks: pycocotools RLE), and empty `pending`. Two copies to the host for all of them, not two an
    image (GPU syncs): each instance's (non-empty, box, area), then every mask, each already in the
    column-major order RLE reads."""
    if not pending:
        return
    # each part in float64 before the cat, which would otherwise round areas past float32's 2^24 pixels
    stats = torch.cat([torch.cat([s.box_masks.flatten(1).any(1)[:, None].double(), _boxes(s.box_masks).double(),
                                  s.masks.flatten(1).sum(1)[:, None].double()], 1) for s in pending]).tolist()
    pixels = torch.cat([s.masks.transpose(1, 2).flatten() for s in pending]).cpu().numpy().view(np.uint8)
    row = start = 0
    for s in pending:
        c, h, w = s.masks.shape
        column_major = pixels[start : start + c * h * w].reshape(c, w, h).transpose(2, 1, 0)  # [h,w,c], no copy
        start += c * h * w
        for j, rle in enumerate(mask_utils.encode(column_major)):
            nonempty, *bbox, area = stats[row + j]
            if nonempty:
                rle["counts"] = rle["counts"].decode("ascii")
                results[s.image].append(PseudoLabel(s.class_indices[j], bbox, float(s.scores[j]), int(area), rle))
        row += c
    pending.clear()


def _corners(boxes: Tensor) -> Tensor:
    """COCO boxes [N,4] (x, y, w, h) -> (x1, y1, x2, y2)."""
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1)


def _boxes(masks: Tensor) -> Tensor:
    """Tight COCO boxes [M,4] (x, y, w, h) of non-empty masks [M,H,W], covering whole pixels."""
    ys = masks.any(2)
    xs = masks.any(1)
    h, w = masks.shape[-2:]
    y_idx = torch.arange(h, device=masks.device)
    x_idx = torch.arange(w, device=masks.device)
    y1 = torch.where(ys, y_idx, h).amin(1)
    y2 = torch.where(ys, y_idx, -1).amax(1) + 1
    x1 = torch.where(xs, x_idx, w).amin(1)
    x2 = torch.where(xs, x_idx, -1).amax(1) + 1
    return torch.stack([x1, y1, x2 - x1, y2 - y1], 1).float()
