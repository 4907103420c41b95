"""One batch of decoded images to pseudo labels: the work a Ray actor does, usable without Ray."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch import Tensor

from ..schemas.config import METHOD_DEFAULTS, AnnotateSettings
from .boxes import RULES, WORK_STRIDE, BoxRule, Judge, PseudoLabel, pseudo_labels, working_maps
from .heatmaps import ClassMaps, class_maps, classify, compute_heatmaps, hooked, normalise
from .models import LoadedModel
from .preprocess import MULTIPLE, prepare_batch, scaled_size
from .regions import Classify, fine_box_holds, folded_into, name_regions, one_box_per_object

CPU_INFO = Path("/proc/cpuinfo")  # its flags say whether the CPU computes bfloat16 natively
CLOSER_VIEW = 3  # a closer look's view: the box's sides times this, around its centre (`Annotator.looked_closer`)
CLOSER_VIEW_MIN = 64  # pixels of the decoded image: the least side of a closer look's view


@dataclass
class BatchResult:
    labels: list[list[PseudoLabel]]
    top_classes: Tensor  # [B, top_k] predicted class indices
    top_scores: Tensor  # [B, top_k]
    maps: list[Tensor]  # per image [K, h, w]: the refined maps behind the labels, over the image only
    classes: Tensor  # [B, K] the class of each map (-1: none)


@dataclass
class FirstPass:
    """A shape group's pass at input_size, unmirrored, as the look makes it: every class's CAM and the
    affinity layer's features. The classes the look names are mapped from it, not from a pass of their own."""

    class_maps: ClassMaps
    features: Tensor | None


@dataclass
class WorkingMaps:
    """One shape group's refined maps [B,K,H/4,W/4] and what turns them into labels at any threshold."""

    members: list[int]  # positions of the group's images in the caller's list
    work: Tensor
    coarse: Tensor | None  # the maps of the smaller scales, where large objects show whole
    classes: Tensor  # [B,K], -1: none
    present: Tensor  # [B,K] probability that each class is present (1 when labelled)
    valid: Tensor  # [B,2] each image's (h, w) in the padded input
    input_size: tuple[int, int]
    sizes: list[tuple[int, int]]  # original (height, width)
    top_classes: Tensor
    top_scores: Tensor
    namer: Classify | None = None  # the model that classifies each instance's crop (`scored_by_crops`)
    batch: Tensor | None = None  # the network input [B,3,H,W] the namer crops; kept only with a namer
    renames: bool = False  # the look's: each region takes its crop's best class (`_named`)
    min_score: float = 0.0  # the look's regions whose crop's best class is less probable are dropped
    named: bool = False  # the classes were named by the look (no labels): one box per object across them
    judge: Judge | None = None  # whether a class's fine box already holds its object (the classifier's view)
    first_pass: FirstPass | None = None  # the look's: what the classes it names are mapped from
    features: Tensor | None = None  # the affinity layer's, which tell two objects of a class from one's parts

    def labels(self, rule: BoxRule) -> list[list[PseudoLabel]]:
        # classes the model names may be one object's near-synonyms (a tabby, a tiger cat): only labelled
        # classes are rivals for pixels (their masks cut, `BoxRule.rival_margin`)
        if self.named or self.renames:
            rule = replace(rule, rival_margin=math.inf)
        found = pseudo_labels(self.work, self.classes, self.present, self.valid, self.input_size, self.sizes, rule,
                              self.coarse, self.judge, self.features)
        if self.renames:
            return self._named(found)
        if self.namer is not None:
            return scored_by_crops(found, self.namer, self.batch, self.valid, self.sizes)
        return _one_box_per_object(found, self.valid, self.sizes) if self.named else found

    def _named(self, found: list[list[PseudoLabel]]) -> list[list[PseudoLabel]]:
        """Each region renamed by its crop's best class (score x that class's probability), then one box
        per object (workers.regions)."""
        flat, owners, boxes = _flattened(found, self.valid, self.sizes)
        if not flat:
            return found
        probability, named = name_regions(self.namer, self.batch, boxes, owners).max(1)
        scores = torch.tensor([p.score for _, p in flat], device=boxes.device) * probability
        keep = one_box_per_object(boxes, scores, named, owners)
        keep = keep[probability[keep] >= self.min_score].tolist()
        named, scores = named.tolist(), scores.tolist()
        renamed: list[list[PseudoLabel]] = [[] for _ in found]
        for j in keep:
            i, p = flat[j]
            renamed[i].append(replace(p, class_index=named[j], score=scores[j]))
        return renamed

    def crops(self) -> list[Tensor]:
        """Each image's maps over the image only (the padding cut off)."""
        return [self.work[j, :, : -(-h // WORK_STRIDE), : -(-w // WORK_STRIDE)]
                for j, (h, w) in enumerate(self.valid.tolist())]


def tightened(p: PseudoLabel, seen: PseudoLabel, view: tuple[float, float, float, float], inner: list[bool],
              size: tuple[int, int]) -> PseudoLabel:
    """Instance p, or its closer look `seen` (in a view at (x, y, w, h) of p's image of that original size, whose
    left, top, right and bottom edges lie inside the image where `inner` says) where that tightens it."""
    vx, vy, vw, vh = view
    x, y, w, h = seen.bbox
    edge = 2.0  # pixels: a box this near a view's inner edge may reach beyond it
    touches = (x < edge, y < edge, x + w > round(vw) - edge, y + h > round(vh) - edge)
    x, y = x + vx, y + vy
    px, py, pw, ph = p.bbox
    centred = px <= x + w / 2 <= px + pw and py <= y + h / 2 <= py + ph
    if any(t and i for t, i in zip(touches, inner, strict=True)) or w * h > 1.5 * pw * ph or not centred:
        return p
    mask = np.zeros(size, dtype=np.uint8, order="F")
    left, top = round(vx), round(vy)
    part = mask_utils.decode(seen.rle)[: size[0] - top, : size[1] - left]
    mask[top : top + part.shape[0], left : left + part.shape[1]] = part
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return replace(p, bbox=[x, y, w, h], area=seen.area, rle=rle)


def scored_by_crops(found: list[list[PseudoLabel]], classify: Classify, batch: Tensor, valid: Tensor,
                    sizes: list[tuple[int, int]]) -> list[list[PseudoLabel]]:
    """`found` (labels of images batch [B,3,H,W], each with its valid (h, w) and original size) with each score
    multiplied by the square root of the probability its crop (`workers.regions.name_regions`) gives its class:
    a box that shows its class ranks above one on the background, across images (box AP50 +0.007 on
    stamps-large, +0.012 on stamps-public). The root, chosen on the sets' first halves, keeps localisation
    first: a part (a head) can look more like its class than the whole object does (bench/README.md)."""
    flat, owners, boxes = _flattened(found, valid, sizes)
    if not flat:
        return found
    classes = torch.tensor([p.class_index for _, p in flat], device=batch.device)
    shown = name_regions(classify, batch, boxes, owners).gather(1, classes[:, None])[:, 0].sqrt().tolist()
    scored: list[list[PseudoLabel]] = [[] for _ in found]
    for (i, p), factor in zip(flat, shown, strict=True):
        scored[i].append(replace(p, score=p.score * factor))
    return scored


def classifier_judge(model: Classify, batch: Tensor) -> Judge:
    """The Judge (workers.boxes) of a batch [B,3,H,W]: `workers.regions.fine_box_holds` at half the batch's
    resolution, near the classifier's own 224 pixels (a quarter of the batch's memory kept)."""
    return partial(_judged_at_half, model, F.interpolate(batch.float(), scale_factor=0.5, mode="area"))


def _judged_at_half(model: Classify, small: Tensor, images: Tensor, classes: Tensor, boxes: Tensor) -> Tensor:
    return fine_box_holds(model, small, images, classes, boxes * (WORK_STRIDE / 2))  # cells -> pixels of small


def _flattened(found: list[list[PseudoLabel]], valid: Tensor, sizes: list[tuple[int, int]],
               ) -> tuple[list[tuple[int, PseudoLabel]], Tensor, Tensor]:
    """Every label of `found` as (image, label), with its image [N] and its box [N,4] (x1, y1, x2, y2 in input
    pixels of images with valid (h, w) and original `sizes`), on valid's device: one tensor for the batch."""
    flat = [(i, p) for i, labels in enumerate(found) for p in labels]
    owners = torch.tensor([i for i, _ in flat], dtype=torch.long, device=valid.device)
    boxes = torch.tensor([p.bbox for _, p in flat], device=valid.device).view(-1, 4)
    scale = valid.flip(1).float() / torch.tensor([(w, h) for h, w in sizes], device=valid.device)
    return flat, owners, torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) * scale[owners].repeat(1, 2)


def _one_box_per_object(found: list[list[PseudoLabel]], valid: Tensor, sizes: list[tuple[int, int]],
                        ) -> list[list[PseudoLabel]]:
    """`found` less the boxes that cover an object a better box covers (`workers.regions.one_box_per_object`).
    The other classes of the boxes folded into a kept one stay on it as its runner-ups (each class's best
    score, best first): a tabby's box keeps "tiger cat" and "Egyptian cat", which named the same cat."""
    flat, owners, boxes = _flattened(found, valid, sizes)
    if not flat:
        return found
    scores = torch.tensor([p.score for _, p in flat], device=valid.device)
    classes = torch.tensor([p.class_index for _, p in flat], device=valid.device)
    keep = one_box_per_object(boxes, scores, classes, owners)
    runner_ups: dict[int, dict[int, float]] = {j: {} for j in keep.tolist()}
    for j, into in enumerate(folded_into(boxes, keep, owners).tolist()):
        rival = flat[j][1]
        if into >= 0 and rival.class_index != flat[into][1].class_index:
            runner_ups[into][rival.class_index] = max(rival.score, runner_ups[into].get(rival.class_index, 0.0))
    kept: list[list[PseudoLabel]] = [[] for _ in found]
    for j, rivals in runner_ups.items():
        i, p = flat[j]
        kept[i].append(replace(p, runner_ups=sorted(rivals.items(), key=lambda r: -r[1])))
    return kept


class Annotator:
    """Holds one model on one device; call it with a list of uint8 [3,H,W] images."""

    def __init__(self, loaded: LoadedModel, settings: AnnotateSettings, named_detail: str | None = None,
                 rule: BoxRule | None = None) -> None:
        """named_detail (the look's): the detail layer of the annotator the look names classes for; the look's
        pass keeps its graph down to that layer, and the named classes' unmirrored detail map comes from it.
        rule: the box rule, by default the settings' (`box_rule`)."""
        self.loaded = loaded
        self.named_detail = named_detail
        self.settings = settings = settings.resolved()
        self.rule = rule or box_rule(settings)
        self.precision = settings.precision
        if self.precision == "auto":
            self.precision = "bfloat16" if native_bfloat16(loaded.device) else "float32"

    @torch.no_grad()
    def __call__(self, images: list[Tensor], labels: list[list[int]] | None = None,
                 sizes: list[tuple[int, int]] | None = None) -> BatchResult:
        """Images of one shape class are run together, so a portrait is never padded to a panorama.
        sizes: each image's original (height, width) when it was decoded smaller (boxes and masks are
        given at that size); by default its own."""
        found: list[list[PseudoLabel]] = [[] for _ in images]
        top_k = min(self.settings.top_k, len(self.loaded.class_names))
        top_classes = torch.empty(len(images), top_k, dtype=torch.long)
        top_scores = torch.empty(len(images), top_k)
        maps: list[Tensor] = [torch.empty(0)] * len(images)
        classes: list[Tensor] = [torch.empty(0)] * len(images)
        for group in self.work(images, labels, sizes):
            found_here = group.labels(self.rule)
            group_classes = group.classes.cpu()
            for j, (i, crop) in enumerate(zip(group.members, group.crops(), strict=True)):
                found[i], maps[i], classes[i] = found_here[j], crop, group_classes[j]
            top_classes[group.members] = group.top_classes.cpu()
            top_scores[group.members] = group.top_scores.float().cpu()
        width = max(len(c) for c in classes)
        padded = torch.stack([F.pad(c, (0, width - len(c)), value=-1) for c in classes])
        if labels is not None:  # without labels a box this small is rarely named right (`looked_closer`)
            found = self.looked_closer(images, found, sizes or [tuple(img.shape[-2:]) for img in images])
        return BatchResult(found, top_classes, top_scores, maps, padded)

    def looked_closer(self, images: list[Tensor], found: list[list[PseudoLabel]], sizes: list[tuple[int, int]],
                      ) -> list[list[PseudoLabel]]:
        """`found` with each box under the rule's `closer_look` share of its image looked at again: its class
        mapped in a view of three times its sides (at least CLOSER_VIEW_MIN pixels) around it, which the pass
        enlarges to input_size (`closer`). The view's top box of the class, and its mask, replace the
        instance's where they tighten it: no more than 1.5 times its area, centred within it, clear of the
        view's edges that lie inside the image (else the object may reach beyond the view). The score stays:
        it ranks across images. Labelled classes' boxes only: without labels every box this small scored
        under 0.02 on 48 public images (parts, and background named as something), looking closer moved no figure
        of either public set, and it took 5-10% of the time (bench/README.md, "One proposal from elsewhere")."""
        if not self.rule.closer_look:
            return found
        views, crops, classes = [], [], []  # views: (image, instance, its (x, y, w, h) and inner edges)
        for i, labels in enumerate(found):
            (height, width), (original_h, original_w) = images[i].shape[-2:], sizes[i]
            sy, sx = height / original_h, width / original_w
            for k, p in enumerate(labels):
                x, y, w, h = p.bbox
                if w * h >= self.rule.closer_look * original_h * original_w:
                    continue
                half_w = max(CLOSER_VIEW * w * sx, CLOSER_VIEW_MIN) / 2
                half_h = max(CLOSER_VIEW * h * sy, CLOSER_VIEW_MIN) / 2
                cx, cy = (x + w / 2) * sx, (y + h / 2) * sy
                x0, y0 = max(0, int(cx - half_w)), max(0, int(cy - half_h))
                x1, y1 = min(width, math.ceil(cx + half_w)), min(height, math.ceil(cy + half_h))
                views.append((i, k, (x0 / sx, y0 / sy, (x1 - x0) / sx, (y1 - y0) / sy),
                              [x0 > 0, y0 > 0, x1 < width, y1 < height]))
                crops.append(images[i][:, y0:y1, x0:x1].contiguous())
                classes.append([p.class_index])
        if not views:
            return found
        seen = self.closer(crops, classes, [(round(view[3]), round(view[2])) for _, _, view, _ in views]).labels
        closer = [list(labels) for labels in found]
        for (i, k, view, inner), labels in zip(views, seen, strict=True):
            if labels:
                closer[i][k] = tightened(closer[i][k], max(labels, key=lambda q: q.score), view, inner, sizes[i])
        return closer

    @cached_property
    def closer(self) -> Annotator:
        """What looks again at small boxes (`looked_closer`): these settings and rule at input_size alone,
        unmirrored, with no closer look. The view's one pass gave other-small what every scale and mirror did
        (box AP 0.510 against 0.520, mask IoU 0.646 against 0.643) at about a ninth of the added time
        (bench/README.md, "A closer look at small boxes")."""
        return Annotator(self.loaded, replace(self.settings, scales=(1.0,), flip=False),
                         rule=replace(self.rule, closer_look=0.0))

    @torch.no_grad()
    def work(self, images: list[Tensor], labels: list[list[int]] | None = None,
             sizes: list[tuple[int, int]] | None = None) -> list[WorkingMaps]:
        """The refined maps of each shape group, before any threshold (what `camlabel calibrate` sweeps).

        Without labels the look names each image's objects first (`look`); their classes are then mapped
        as labelled ones are, each present as surely as it was named, with one box kept per object."""
        sizes = sizes or [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images = upload(images, self.loaded.device)
        if labels is not None:  # a class listed twice (one per object: "hen hen") is one class, mapped once
            return self._groups(images, [list(dict.fromkeys(row)) for row in labels], sizes)
        named: list[dict[int, float]] = [{} for _ in images]  # each image's named classes, each's best score
        found, first_passes = self.look.regions(images, sizes)
        for i, regions in enumerate(found):
            for p in regions:  # best first
                named[i].setdefault(p.class_index, p.score)
        return self._groups(images, [list(n) for n in named], sizes, [list(n.values()) for n in named], first_passes)

    @cached_property
    def look(self) -> Annotator:
        """What names objects when no labels are given: the same model and rule at input_size alone,
        unmirrored and unrefined (a small share of the model work). Mapping the classes it names again, as
        labelled ones, finds far more whole objects than cutting its proposals' own maps, whose classes are
        often wrong and which may not spread (bench/README.md). It keeps the rule's own thresholds: given
        ones set the final cut (what `camlabel calibrate` sweeps), not which objects are named."""
        return Annotator(self.loaded, replace(self.settings, scales=(1.0,), flip=False, refine=False,
                                              threshold=None, mask_threshold=None),
                         named_detail=detail_layer(self.loaded, self.settings))

    def regions(self, images: list[Tensor], sizes: list[tuple[int, int]],
                ) -> tuple[list[list[PseudoLabel]], list[FirstPass | None]]:
        """Each image's regions, proposed by its top classes and named by their crops (`WorkingMaps._named`),
        best first: what the look is for; and each shape group's first pass, to map the named classes from."""
        found: list[list[PseudoLabel]] = [[] for _ in images]
        first_passes = []
        for group in self._groups(images, None, sizes):
            for i, labels in zip(group.members, group.labels(self.rule), strict=True):
                found[i] = labels
            first_passes.append(group.first_pass)
        return found, first_passes

    def _groups(self, images: list[Tensor], labels: list[list[int]] | None, sizes: list[tuple[int, int]],
                sureness: list[list[float]] | None = None, first_passes: list[FirstPass | None] | None = None,
                ) -> list[WorkingMaps]:
        """first_passes: the look's, group by group (the same images group alike)."""
        groups = []
        for g, ((rows, cols), members) in enumerate(shape_groups(images, self.settings.input_size).items()):
            padded_size = (rows * GROUP_STEP, cols * GROUP_STEP)
            groups.append(self._work([images[i] for i in members],
                                     None if labels is None else [labels[i] for i in members], padded_size, members,
                                     [sizes[i] for i in members],
                                     None if sureness is None else [sureness[i] for i in members],
                                     None if first_passes is None else first_passes[g]))
        return groups

    def _work(self, images: list[Tensor], labels: list[list[int]] | None, padded_size, members,
              sizes: list[tuple[int, int]], sureness: list[list[float]] | None,
              first: FirstPass | None = None) -> WorkingMaps:
        """One shape group's WorkingMaps: of the labelled (or named) classes, or of the look's proposals.
        sureness: how surely each named class was named (it scales its instances' scores); None: labelled.
        first: the look's first pass over these images, which their maps at input_size come from."""
        s = self.settings
        device = self.loaded.device
        batch, valid = prepare_batch(images, s.input_size, device, pad_to=padded_size)
        if labels is None:  # the look: the classes whose evidence peaks highest, from a pass kept for later
            first = self._first_pass(batch)
            targets = None if first is None else first.class_maps.proposals(valid, batch.shape[-2], s.top_k)
        else:
            targets = _rows(labels, -1, torch.long, device)
        # the spread widens whatever a map holds: only the classes labelled or named (a proposal's, of a class
        # that may be wrong, would swell over the background and its crop take the object's name)
        spread = s.refine and labels is not None
        with self.features_captured() if spread and first is None else nullcontext({}) as captured:
            heat, coarse = self._heatmaps_multiscale(images, batch, valid, targets, first)
        features = (captured.get("features") if first is None else first.features) if spread else None
        classes, scores = heat.classes, heat.scores
        top = heat.probs.topk(min(s.top_k, heat.probs.shape[1]), dim=1)
        # labelled classes are present (their instances then scored by their crops); named ones as surely as
        # they were named; the look's regions are scored by their crops (the namer's probability)
        present = torch.ones_like(scores) if sureness is None else _rows(sureness, 0.0, scores.dtype, device)
        input_size = tuple(batch.shape[-2:])
        both = heat.maps if coarse is None else torch.cat([heat.maps, coarse], 1)  # refined together
        work = working_maps(both, valid, input_size, guide=batch if s.refine else None,
                            features=features, set_size=heat.maps.shape[1])
        work, coarse = (work, None) if coarse is None else work.split(heat.maps.shape[1], 1)
        # calibrate keeps every group's WorkingMaps: the batch (megabytes an image) only where it is cropped:
        # for the look's regions and, where the rule says so, labelled classes' instances (named classes are
        # scored as surely as they were named)
        crops = labels is None or (sureness is None and self.rule.crop_scores)
        cropped = {"namer": self._classify, "batch": batch} if crops else {}
        if labels is not None:
            judge = None if coarse is None else classifier_judge(self._classify, batch)
            return WorkingMaps(members, work, coarse, classes, present, valid, input_size, sizes, top.indices,
                               top.values, **cropped, named=sureness is not None, judge=judge, features=features)
        return WorkingMaps(members, work, coarse, classes, present, valid, input_size, sizes, top.indices,
                           top.values, **cropped, renames=True, min_score=s.min_score, first_pass=first)

    @contextmanager
    def features_captured(self) -> Iterator[dict[str, Tensor]]:
        """Within: the affinity layer's output of the first pass, the batch at input_size unmirrored, kept
        in the yielded dict under "features" (nothing when the model has no such layer)."""
        captured: dict[str, Tensor] = {}
        layer = self.loaded.affinity_layer
        if layer is None:
            yield captured
            return

        def keep_first(_module, _inputs, out: Tensor) -> None:
            captured.setdefault("features", out.detach())

        with hooked(self.loaded.model.get_submodule(layer), keep_first):
            yield captured

    def _first_pass(self, batch: Tensor) -> FirstPass | None:
        """The look's pass over `batch`: every class's CAM (`heatmaps.ClassMaps`: whose evidence peaks
        highest, and their maps) and the features the spread reads; None for heads that are not GAP + linear
        (the top predicted classes are proposed)."""
        with self.features_captured() as captured, self._passes():
            maps = class_maps(self.loaded.model, batch, target_layer=self.loaded.target_layer,
                              detail_layer=self.named_detail)
        return None if maps is None else FirstPass(maps, captured.get("features"))

    def _heatmaps_multiscale(self, images, batch, valid, targets, first: FirstPass | None = None):
        """Maps at every scale, each sampled straight onto the working grid (WORK_STRIDE cells of the
        input_size batch, the same image point per cell). Scales above 1 resolve small objects that one
        coarse map blurs together with their surroundings; smaller ones see a large object whole. With a
        rule for large objects, returns (heatmaps with the mean map of all scales but the smallest and of the
        detail map (`maps_per_scale`), mean map of all but the largest); else (heatmaps with the mean of all,
        None)."""
        kept, per_scale, detail = self.maps_per_scale(images, batch, valid, targets, first)
        ordered = [per_scale[s] for s in sorted(per_scale)]
        if self.rule.large is None or len(ordered) < 2:
            kept.maps = mean_map(ordered)
            return kept, None
        kept.maps = mean_map(ordered[1:] + ([] if detail is None else [detail]))
        return kept, mean_map(ordered[:-1])

    def maps_per_scale(self, images, batch, valid, targets, first: FirstPass | None = None):
        """(heatmaps at input_size, {scale: maps [B,K,H/4,W/4] on the working grid of `batch`}, the detail map
        on that grid or None). Classes and probabilities always come from input_size, nearer the resolution
        the classifier was trained at; every scale maps the same classes (bench/extents.py sweeps how scales
        are combined). first: a pass already made over `batch`, which CAM's unmirrored maps at input_size are
        taken from.

        The detail map joins the fine extent's mean (a third of it): LayerCAM (Jiang et al. 2021, positive
        gradients times activations) at the affinity layer (stride 16, twice CAM's resolution) of the pass at
        input_size, the same pass as CAM's there (`detail_layer`). The larger scales resolve small objects but
        see a large one's most telling part; the finer layer at input_size sees its whole outline. It lifted
        every figure on both halves of both public sets (bench/README.md)."""
        scales = sorted(self.settings.scales, key=lambda s: s != 1.0)  # input_size first, when present
        largest = max(scales) if len(scales) > 1 else None
        kept = None
        if scales[0] != 1.0:
            with self._passes():
                kept = classify(self.loaded.model, batch, targets, self.settings.top_k)
        grid = (batch.shape[-2] // WORK_STRIDE, batch.shape[-1] // WORK_STRIDE)
        per_scale, detail = {}, None
        layer = detail_layer(self.loaded, self.settings)
        for scale in scales:
            if scale == 1.0:
                scaled, scaled_valid = batch, valid
            else:
                size = round(self.settings.input_size * scale)
                scaled, scaled_valid = prepare_batch(images, size, batch.device, pad_to=_grid(batch.shape[-2:], scale))
            here = self._heatmaps(scaled, scaled_valid, targets if kept is None else kept.classes,
                                  first if scale == 1.0 else None, mirror=scale != largest,
                                  detail=layer if scale == 1.0 else None)
            kept = here if kept is None else kept
            per_scale[scale] = resample_maps(here.maps, scaled_valid, scaled.shape[-2:], grid, valid, batch.shape[-2:])
            if here.detail is not None:
                # divided by its max again, so that it weighs in the mean as much as each scale's map: resampled
                # onto the working grid, its sharper peaks fall to 0.8-0.9 of their height (the scales' 0.95-0.99)
                detail = normalise(resample_maps(here.detail, valid, batch.shape[-2:], grid, valid, batch.shape[-2:]))
        return kept, per_scale, detail

    def _heatmaps(self, batch: Tensor, valid: Tensor, targets: Tensor | None, first: FirstPass | None = None,
                  mirror: bool = True, detail: str | None = None):
        """Maps of `batch` by the settings' method at the target layer (with `detail`, and CAM's LayerCAM at
        that layer, `compute_heatmaps`), averaged with its mirror image's when the settings flip and `mirror`
        says so. The largest of several scales is not mirrored: its map is the finest, the mirror changed its
        labels by a point or less either way, and it was a fifth of the default's time (bench/README.md)."""
        s = self.settings
        model = self.loaded.model
        heatmaps_of = partial(compute_heatmaps, model, target_layer=self.loaded.target_layer, method=s.method,
                              top_k=s.top_k, detail_layer=detail)
        if first is not None and s.method == "cam":
            heat = first.class_maps.heatmaps(targets)
            if detail is not None:  # from the look's pass, which kept its graph down to the detail layer
                with self._passes():
                    heat.detail = first.class_maps.detail(targets)
        else:
            with self._passes():
                heat = heatmaps_of(batch, targets=targets)
        if s.flip and mirror:
            # flip each image inside its own valid region so padding stays bottom/right
            flipped = _flip_valid(batch, valid).contiguous(memory_format=torch.channels_last)
            with self._passes():
                other = heatmaps_of(flipped, targets=heat.classes)
            heat.maps = _mirror_mean(heat.maps, other.maps, valid, batch.shape[-1])
            if detail is not None:
                heat.detail = _mirror_mean(heat.detail, other.detail, valid, batch.shape[-1])
        return heat

    def _classify(self, images: Tensor) -> Tensor:
        """The model's logits for `images`: how regions' crops and the judge's images are classified. Without
        cuDNN, as every pass (`_passes`), but in float32 whatever the precision: named in bfloat16, the crops
        cost stamps-public 7 of its 495 objects without labels (bench/README.md)."""
        with torch.autocast(self.loaded.device.type, enabled=False), torch.backends.cudnn.flags(enabled=False):
            return self.loaded.model(images)

    @contextmanager
    def _passes(self):
        """The model's passes: bfloat16 autocast (a no-op in float32), and no cuDNN. cuDNN spent 15-34 s
        choosing kernels for each batch of new input shapes on an H200 (bench/README.md), and every batch
        brings new ones, images keeping their aspect ratios; PyTorch's own kernels choose nothing and ran
        the same batches in 0.4-0.7 s, as fast as cuDNN on shapes it had seen."""
        with (torch.autocast(self.loaded.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"),
              torch.backends.cudnn.flags(enabled=False)):
            yield


def box_rule(settings: AnnotateSettings) -> BoxRule:
    """The rule that turns the maps of these settings into labels: the named rule with the thresholds
    given (masks follow a threshold given alone); a method with thresholds of its own gets one extent."""
    settings = settings.resolved()
    rule = RULES[settings.rule]
    if settings.threshold is not None:
        rule = replace(rule, threshold=settings.threshold, mask_threshold=settings.threshold)
    if settings.mask_threshold is not None:
        rule = replace(rule, mask_threshold=settings.mask_threshold)
    if "threshold" in METHOD_DEFAULTS.get(settings.method, {}):
        rule = replace(rule, grow=None, large=None, wide_drop=0.0)
    return rule


def detail_layer(loaded: LoadedModel, settings: AnnotateSettings) -> str | None:
    """The layer whose LayerCAM joins the fine maps (`Annotator.maps_per_scale`): the model's affinity layer,
    with CAM (the method it was measured with) and two extents (a rule for large objects and several scales,
    input_size among them); else None. Each manifest records it, so that runs made without it form another
    series."""
    settings = settings.resolved()
    two_extents = box_rule(settings).large is not None and len(settings.scales) > 1
    if settings.method != "cam" or not two_extents or 1.0 not in settings.scales:
        return None
    return loaded.affinity_layer


def _rows(rows: list[list], fill, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Rows of unequal length as one [len(rows), longest (at least 1)] tensor, padded with `fill`."""
    out = torch.full((len(rows), max(1, max(len(r) for r in rows))), fill, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out.to(device)


def upload(images: list[Tensor], device: torch.device) -> list[Tensor]:
    """Each uint8 image onto a GPU once per batch, from pinned memory so that the copies run async; every
    scale then resizes it there (uploading per scale copied each image three times)."""
    if device.type != "cuda":
        return images
    return [image.pin_memory().to(device, non_blocking=True) for image in images]


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16
    or AMX (Linux's CPU flags). Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = CPU_INFO.read_text()
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) is not None


def mean_map(maps: list[Tensor]) -> Tensor:
    """The mean of maps [B,K,h,w], each result map divided by its max."""
    total = sum(maps)
    return total / total.flatten(2).amax(-1).clamp(min=1e-7)[..., None, None]


def _mirror_mean(maps: Tensor, mirrored: Tensor, valid: Tensor, input_width: int) -> Tensor:
    """`mean_map` of maps [B,K,h,w] of a batch (valid [B,2] of an input `input_width` pixels wide) and those of
    its mirror image, mirrored back."""
    scale = maps.shape[-1] / input_width
    return mean_map([maps, _flip_valid(mirrored, (valid.float() * scale).ceil().long())])


def _flip_valid(x: Tensor, valid: Tensor) -> Tensor:
    """Mirror each item's top-left valid[i] = (h, w) region left-right; the padding stays in place."""
    width = x.shape[-1]
    cols = torch.arange(width, device=x.device)
    w = valid[:, 1].clamp(max=width)[:, None]
    source = torch.where(cols[None] < w, w - 1 - cols[None], cols[None])  # [B, W]
    index = source[:, None, None, :].expand_as(x)
    return x.gather(-1, index)


def resample_maps(maps: Tensor, valid: Tensor, input_size, grid_size, to_valid: Tensor, to_input_size) -> Tensor:
    """Maps [B,K,h,w] of a padded batch (valid [B,2] of input_size) sampled on the grid_size cells of
    another padded batch of the same images (to_valid, to_input_size): the same image point per cell."""
    gh, gw = grid_size
    th, tw = to_input_size
    ys = (torch.arange(gh, device=maps.device) + 0.5) * (th / gh)  # cell centres, target input pixels
    xs = (torch.arange(gw, device=maps.device) + 0.5) * (tw / gw)
    fy = valid[:, 0].float() / to_valid[:, 0].float()  # target pixels -> source pixels, per image
    fx = valid[:, 1].float() / to_valid[:, 1].float()
    sy = ys[None] * fy[:, None] / input_size[0] * 2 - 1  # [B, gh]
    sx = xs[None] * fx[:, None] / input_size[1] * 2 - 1  # [B, gw]
    grid = torch.stack([sx[:, None, :].expand(-1, gh, -1), sy[:, :, None].expand(-1, -1, gw)], -1)
    return F.grid_sample(maps, grid.to(maps.dtype), mode="bilinear", padding_mode="border", align_corners=False)


GROUP_STEP = 2 * MULTIPLE


def shape_groups(images: list[Tensor], short_side: int) -> dict[tuple[int, int], list[int]]:
    """Images by the padded input they need, in GROUP_STEP cells: (rows, cols) -> indices.

    Padding to the group's fixed size, not to the largest image present, makes every image's result
    independent of the batch it happened to share (a resumed run gives what an uninterrupted one did).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(shape_key(image.shape[-2], image.shape[-1], short_side), []).append(i)
    return groups


def shape_key(height: int, width: int, short_side: int) -> tuple[int, int]:
    """The shape group of an image of height x width: its padded input in GROUP_STEP cells."""
    h, w = scaled_size(height, width, short_side, 2 * short_side)
    return -(-h // GROUP_STEP), -(-w // GROUP_STEP)


def _grid(size, scale: float) -> tuple[int, int]:
    """A padded size `scale` times `size`, on the 32-pixel grid (fixed per group, as above)."""
    return tuple(-(-round(n * scale) // MULTIPLE) * MULTIPLE for n in size)
