"""Class activation maps for a whole batch in one call, on the model's device.

Every method answers the same call, `compute_heatmaps(model, images, method=..., targets=...)`, and
returns maps `[B, K, h, w]` in [0, 1] (ReLU, then divided by each map's max: 0.2 means "20% of the
peak") for K target classes per image. Methods that differ only in how they weight the target layer's
channels are one small function each in `WEIGHTINGS`.

The user's model is never left changed: hooks are removed, train/eval flags, `requires_grad` flags
and in-place ReLU settings are restored in `finally`, also when a call raises. Gradients are taken
with `torch.autograd.grad` with respect to the target layer only (or CAM's `detail_layer`): no parameter
`.grad` is written and no graph is recorded below that layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schemas.config import METHODS

EPS = 1e-7


@dataclass
class Heatmaps:
    """maps [B,K,h,w] in [0,1]; classes [B,K] (-1 = padding); scores [B,K] softmax probability of each
    class; probs [B,num_classes] the softmax over all classes."""

    maps: Tensor
    classes: Tensor
    scores: Tensor
    probs: Tensor
    detail: Tensor | None = None  # [B,K,h',w'] LayerCAM at `compute_heatmaps`' detail_layer, from the same pass


class HeatmapError(ValueError):
    """A method that cannot run on this model or these arguments; the message says what to use."""


# Channel (or element) weights from activations A [B,C,h,w] and gradients G [B,C,h,w] of one class score.
# The map is ReLU(sum_k weights_k * A_k); each entry is the paper's own definition.
WEIGHTINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    # Selvaraju et al. 2017: global-average-pooled gradients.
    "gradcam": lambda a, g: g.mean((2, 3), keepdim=True),
    # Chattopadhay et al. 2018, closed form for an exponential score.
    "gradcam++": lambda a, g: (
        g.clamp(min=0)
        * torch.where(g != 0, g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3 + EPS), 0.0)
    ).sum((2, 3), keepdim=True),
    # Fu et al. 2020: activation-weighted gradients, normalised by the channel's activation mass.
    "xgradcam": lambda a, g: (g * a).sum((2, 3), keepdim=True) / (a.sum((2, 3), keepdim=True) + EPS),
    # Jiang et al. 2021: element-wise positive gradients.
    "layercam": lambda a, g: g.clamp(min=0),
    # Draelos & Carin 2020: element-wise gradients (no pooling).
    "hirescam": lambda a, g: g,
}
GRADIENT_METHODS = tuple(WEIGHTINGS)
PERTURBATION_CHUNK = 64  # Score-CAM channels or occlusion positions per extra forward pass: bounds memory
OCCLUSION_PATCH = 48  # Zeiler & Fergus' grey square, in input pixels (about an object part at 448)
OCCLUSION_STRIDE = 24  # half a patch: every pixel is covered by four positions
# target layer -> whether its head's input is the GAP of the layer's ReLU (DenseNet) rather than of the layer:
# checked on a layer's first CAM, not on every pass (the comparison is a host sync on a GPU)
_GAP_OF_RELU: WeakKeyDictionary[nn.Module, bool] = WeakKeyDictionary()
SCORECAM_CHANNELS = 256  # Score-CAM's extra forward passes per image, at most (the channels that fire hardest)


def normalise(maps: Tensor) -> Tensor:
    """ReLU, then divide each map [..., h, w] by its own max; an all-non-positive map stays 0."""
    maps = maps.clamp(min=0)
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps / peak.clamp(min=EPS)


@contextmanager
def restored(model: nn.Module) -> Iterator[None]:
    """Put the model back as found: train/eval flags, requires_grad flags and in-place ReLU settings."""
    modules = list(model.modules())
    modes = {m: m.training for m in modules}
    grads = {p: p.requires_grad for p in model.parameters()}
    inplace = {m: m.inplace for m in modules if hasattr(m, "inplace")}
    try:
        yield
    finally:
        for m, flag in modes.items():
            m.training = flag
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for m, flag in inplace.items():
            m.inplace = flag


@contextmanager
def hooked(module: nn.Module, hook: Callable, pre: bool = False) -> Iterator[None]:
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        raise HeatmapError(f"no layer {name!r}; spatial layers end with: {', '.join(names[-8:])}") from None


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier's last Linear layer and its name: CAM weighs maps with it, the head's input is
    hooked there, and its outputs are the class count."""
    linear = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise HeatmapError(f"{type(model).__name__} has no Linear classifier layer; camlabel needs one "
                           "(convolutional heads such as squeezenet's are not supported)")
    return linear[-1]


def _classifier(model: nn.Module) -> nn.Linear:
    return classifier_layer(model)[1]


def _forward_capturing(model: nn.Module, layer: nn.Module, images: Tensor, with_grad: bool,
                       leaf: nn.Module | None = None):
    """Forward pass that returns (logits, activations of `layer`, input of the last Linear, activations of
    `leaf`, by default `layer`).

    With `with_grad`, the leaf's activations become the graph's leaf so gradients stop there.
    """
    leaf = leaf or layer
    store: dict[str, Tensor] = {}

    def capture(name: str, is_leaf: bool) -> Callable:
        def keep(_m, _i, out: Tensor) -> Tensor:
            kept = out.detach().requires_grad_(with_grad and is_leaf)
            store[name] = kept
            return (kept if is_leaf else out).clone()  # a later in-place op must not overwrite what we keep
        return keep

    def capture_head_input(_m, inputs) -> None:
        store["head_in"] = inputs[0]

    with ExitStack() as hooks:
        hooks.enter_context(hooked(leaf, capture("leaf", True)))
        if leaf is not layer:
            hooks.enter_context(hooked(layer, capture("a", False)))
        hooks.enter_context(hooked(_classifier(model), capture_head_input, pre=True))
        hooks.enter_context(torch.set_grad_enabled(with_grad))
        logits = model(images)
    return logits, store.get("a", store["leaf"]), store.get("head_in"), store["leaf"]


def _resolve_targets(probs: Tensor, targets: Tensor | None, top_k: int) -> Tensor:
    if targets is None:
        return probs.topk(min(top_k, probs.shape[1]), dim=1).indices
    targets = torch.as_tensor(targets, device=probs.device, dtype=torch.long)
    if targets.dim() == 1:
        targets = targets[:, None]
    if targets.shape[0] != probs.shape[0]:
        raise HeatmapError(f"targets has {targets.shape[0]} rows for {probs.shape[0]} images")
    if ((targets >= probs.shape[1]) | (targets < -1)).any():  # one comparison: one host sync on a GPU
        raise HeatmapError(f"target classes must lie in [0, {probs.shape[1]}) (-1 pads)")
    return targets


def classify(model: nn.Module, images: Tensor, targets: Tensor | None = None, top_k: int = 1) -> Heatmaps:
    """Classes, scores and probabilities exactly as `compute_heatmaps` resolves them, from a plain
    forward pass (maps left empty)."""
    with restored(model), torch.no_grad():
        model.eval()
        probs = model(images).float().softmax(1)
    classes = _resolve_targets(probs, targets, top_k)
    return Heatmaps(images.new_zeros(0), classes, probs.gather(1, classes.clamp(min=0)) * (classes >= 0), probs)


@dataclass
class ClassMaps:
    """Every class's CAM of a batch, from one forward pass of a GAP + linear head: the heatmaps of any
    classes and each class's peak evidence without another pass (the look proposes classes, maps them,
    and the classes its crops name are mapped again, all on the same batch)."""

    cams: Tensor  # [B, classes, h, w]: sum_k w_kc f_k, before normalising
    bias: Tensor  # [classes] the head's bias
    probs: Tensor  # [B, classes] the softmax of the pass
    logits: Tensor | None = None  # with a detail layer: the pass's logits, their graph kept down to
    leaf: Tensor | None = None  # that layer's activations (`detail`)

    def heatmaps(self, targets: Tensor) -> Heatmaps:
        """What `compute_heatmaps` gives for method "cam" and these targets [B,K] (-1 pads)."""
        safe = targets.clamp(min=0)
        raw = self.cams.gather(1, safe[..., None, None].expand(-1, -1, *self.cams.shape[-2:]))
        present = targets >= 0
        return Heatmaps(normalise(raw.float()) * present[..., None, None], targets,
                        self.probs.gather(1, safe) * present, self.probs)

    def detail(self, targets: Tensor) -> Tensor:
        """What `compute_heatmaps(detail_layer=...)` gives as `Heatmaps.detail` for these targets [B,K]: LayerCAM
        at the detail layer, from the graph the pass kept, so no second forward pass. Once: its last backward
        frees the graph, and the ClassMaps lets go of it."""
        if self.logits is None:
            raise HeatmapError("no graph kept: the pass had no detail_layer, or its detail was taken already")
        logits, leaf, self.logits, self.leaf = self.logits, self.leaf, None, None
        return _layercam(logits, leaf, targets)

    def proposals(self, valid: Tensor, input_height: int, k: int) -> Tensor:
        """The classes the look maps [B, k+1] (-1 pads), by their local probability.

        A GAP + linear head scores every location of the target layer as it scores the whole image (the
        CAM of every class plus its bias); the softmax over classes at each location, maxed over the
        image's own cells (valid [B,2] of the padded input, `input_height` pixels high), finds an object
        that fills a tenth of a cluttered scene, which the whole image's average (its softmax) buries under
        the background's classes. The k classes whose local probability peaks highest are proposed, and the
        best-peaking of those that are the most probable class at some cell but not among the k: a large
        object's k are often its near-synonyms (tabby, tiger cat, Egyptian cat), and an object beside it that
        wins its own cells would go unproposed (bench/README.md, "One proposal from elsewhere").
        """
        local = self._local_probability(valid, input_height)
        peaks = local.amax(2)
        top = peaks.topk(min(k, peaks.shape[1]), dim=1).indices
        wins = ((local == local.amax(1, keepdim=True)) & (local > 0)).any(2)  # padding's cells are all 0
        other = (peaks * wins.scatter(1, top, False)).max(1)
        return torch.cat([top, torch.where(other.values > 0, other.indices, -1)[:, None]], 1)

    def _local_probability(self, valid: Tensor, input_height: int) -> Tensor:
        """[B, classes, cells]: each cell's softmax over classes, 0 on the padding."""
        local = self.cams.float() + self.bias.float()[:, None, None]
        h, w = local.shape[-2:]
        stride = input_height / h
        rows = torch.arange(h, device=local.device)[None, :, None] < (valid[:, 0, None, None] / stride).ceil()
        cols = torch.arange(w, device=local.device)[None, None, :] < (valid[:, 1, None, None] / stride).ceil()
        return (local.softmax(1) * (rows & cols)[:, None]).flatten(2)


def class_maps(model: nn.Module, images: Tensor, *, target_layer: str, detail_layer: str | None = None
               ) -> ClassMaps | None:
    """Every class's CAM of `images` [B,3,H,W] from one pass, or None for a model whose head is not
    GAP + linear. detail_layer: the pass keeps its graph down to that layer, for the LayerCAM of classes
    chosen later (`ClassMaps.detail`)."""
    layer = _layer(model, target_layer)
    leaf = None if detail_layer is None else _layer(model, detail_layer)
    with restored(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)  # the kept graph ends at the detail layer
        logits, acts, head_in, kept = _forward_capturing(model, layer, images, leaf is not None, leaf)
        head = _classifier(model)
        classes = torch.arange(head.out_features, device=images.device).expand(len(images), -1)
        try:
            with torch.no_grad():
                cams = _cam(model, layer, acts, head_in, classes)
        except HeatmapError:
            return None
    bias = head.bias if head.bias is not None else cams.new_zeros(head.out_features)
    graph = (logits, kept) if leaf is not None else (None, None)
    return ClassMaps(cams, bias.detach(), logits.detach().float().softmax(1), *graph)


def compute_heatmaps(
    model: nn.Module,
    images: Tensor,
    *,
    target_layer: str,
    method: str = "cam",
    targets: Tensor | None = None,
    top_k: int = 1,
    chunk_size: int = PERTURBATION_CHUNK,
    patch: int = OCCLUSION_PATCH,
    stride: int = OCCLUSION_STRIDE,
    detail_layer: str | None = None,
) -> Heatmaps:
    """Heatmaps for `images` [B,3,H,W] (normalised, on the model's device).

    targets: class indices [B,K] (-1 pads rows with fewer labels) or None for the top_k predicted
    classes. Eigen-CAM is class-agnostic: every target gets the same map. Maps are at the target layer's
    resolution, except occlusion (patch grid) and deconvnet/guided (input pixels).
    chunk_size bounds the extra forward passes held at once by Score-CAM and occlusion.
    detail_layer: with CAM, an earlier layer whose LayerCAM the same pass also gives (`Heatmaps.detail`):
    gradients flow down to that layer only, and a second pass is saved.
    """
    if method not in METHODS:
        raise HeatmapError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if detail_layer is not None and method != "cam":
        raise HeatmapError(f"a detail layer comes with method 'cam' only, not {method!r}")
    layer = _layer(model, target_layer)
    detail_at = None if detail_layer is None else _layer(model, detail_layer)
    with restored(model):
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if method in ("deconvnet", "guided"):
            return _pixel_views(model, images, targets, top_k, method)
        with_grad = method in GRADIENT_METHODS or detail_at is not None
        logits, acts, head_in, leaf = _forward_capturing(model, layer, images, with_grad, detail_at)
        probs = logits.detach().float().softmax(1)
        classes = _resolve_targets(probs, targets, top_k)
        safe = classes.clamp(min=0)
        if method == "cam":
            raw = _cam(model, layer, acts, head_in, safe)
        elif method in GRADIENT_METHODS:
            raw = _gradient_cam(logits, acts, safe, WEIGHTINGS[method])
        elif method == "eigencam":
            raw = eigen_projection(acts)[:, None].expand(-1, classes.shape[1], -1, -1)
        elif method == "scorecam":
            raw = _score_cam(model, images, acts.detach(), safe, chunk_size, SCORECAM_CHANNELS)
        else:
            raw = _occlusion(model, images, probs, safe, chunk_size, patch, stride)
        present = (classes >= 0)[..., None, None]
        detail = None if detail_at is None else _layercam(logits, leaf, classes)
        maps = normalise(raw.detach().float()) * present
        return Heatmaps(maps, classes, probs.gather(1, safe) * (classes >= 0), probs, detail)


def _layercam(logits: Tensor, leaf: Tensor, classes: Tensor) -> Tensor:
    """The detail map: LayerCAM of `classes` [B,K] (-1 pads) at the graph's leaf, normalised, 0 for pads."""
    maps = _gradient_cam(logits, leaf, classes.clamp(min=0), WEIGHTINGS["layercam"]).float()
    return normalise(maps) * (classes >= 0)[..., None, None]


def _cam(model: nn.Module, layer: nn.Module, acts: Tensor, head_in: Tensor | None, classes: Tensor) -> Tensor:
    """Zhou et al. 2016: CAM_c = sum_k w_kc f_k, valid only when the head is GAP + linear.

    Checked, not assumed, on the layer's first CAM: the last Linear's input must equal the spatial mean
    of the target layer's activations (or of their ReLU, as in DenseNet).
    """
    head = _classifier(model)
    if layer not in _GAP_OF_RELU:
        _GAP_OF_RELU[layer] = _head_reads_gap(model, acts, head_in)
    f = acts.clamp(min=0) if _GAP_OF_RELU[layer] else acts
    return torch.einsum("bkc,bchw->bkhw", head.weight[classes].to(f.dtype), f)  # weights [B,K,C]


def _head_reads_gap(model: nn.Module, acts: Tensor, head_in: Tensor | None) -> bool:
    """Whether the last Linear's input head_in is the GAP of the ReLU of acts (True) or of acts (False);
    HeatmapError when it is neither."""
    rtol = max(1e-3, 4 * torch.finfo(acts.dtype).eps)  # under bfloat16 autocast both means round coarsely
    for relu in (False, True):
        candidate = (acts.clamp(min=0) if relu else acts).mean((2, 3))
        if head_in is not None and head_in.shape == candidate.shape and torch.allclose(
            head_in.float(), candidate.float(), atol=1e-4, rtol=rtol
        ):
            return relu
    head = _classifier(model)
    found = "no Linear input" if head_in is None else f"Linear input {tuple(head_in.shape)} is not the GAP of the layer"
    raise HeatmapError(
        f"CAM needs a global-average-pooling + linear head after the target layer; found {head} ({found}). "
        "Use method 'gradcam', which works with any head."
    )


def _gradient_cam(logits: Tensor, acts: Tensor, classes: Tensor, weighting) -> Tensor:
    """One backward per target rank k (all images at once), down to the target layer only."""
    maps = []
    with torch.enable_grad():
        for k in range(classes.shape[1]):
            score = logits.gather(1, classes[:, k : k + 1]).sum()
            (grads,) = torch.autograd.grad(score, acts, retain_graph=k + 1 < classes.shape[1])
            maps.append((weighting(acts, grads) * acts).sum(1).detach())
    return torch.stack(maps, 1)


def eigen_projection(acts: Tensor) -> Tensor:
    """Muhammad & Yeasin 2020: activations [B,C,h,w] projected on their first principal component.

    Each image's h*w activation vectors X [hw, C] are centred; the projection on the first right
    singular vector is X v1 = s1 u1, taken from the leading eigenpair of the small Gram matrix
    X X^T [hw, hw] (the same result as an SVD of X, without the C-sized factor). The sign is chosen so
    the projection correlates positively with the channel-summed activations.
    """
    b, c, h, w = acts.shape
    with torch.autocast(acts.device.type, enabled=False):  # eigh takes no bfloat16, and under CUDA autocast
        x = acts.float().flatten(2).transpose(1, 2)  # [B, hw, C]  the Gram product and its squares would run in it
        x = x - x.mean(1, keepdim=True)
        vector, value = leading_eigenpair(x @ x.transpose(1, 2))
    proj = vector * value[:, None].clamp(min=0).sqrt()  # [B, hw]
    total = acts.float().sum(1).flatten(1)
    total = total - total.mean(1, keepdim=True)
    sign = torch.sign((proj * total).sum(1))
    sign = torch.where(sign == 0, 1.0, sign)
    return (proj * sign[:, None]).view(b, h, w)


def leading_eigenpair(gram: Tensor) -> tuple[Tensor, Tensor]:
    """The unit eigenvector [B,n] of symmetric PSD matrices [B,n,n] with the largest eigenvalue, and that
    eigenvalue [B]: LAPACK's eigh on the CPU; on CUDA, whose eigh solves a batch's matrices one after
    another (Eigen-CAM ran at 0.04-0.09x the forward pass at 448 px on an H200: bench/README), by squaring."""
    if gram.is_cuda:
        return leading_eigenpair_by_squaring(gram)
    values, vectors = torch.linalg.eigh(gram)  # ascending
    return vectors[..., -1], values[:, -1]


def leading_eigenpair_by_squaring(gram: Tensor) -> tuple[Tensor, Tensor]:
    """`leading_eigenpair` in a dozen batched matrix products: G squared 12 times, each scaled to trace 1,
    is v1 v1^T up to (l2/l1)^4096 (3e-4 where l2/l1 = 0.998); its column of the largest diagonal entry
    gives v1's direction."""
    def unit_trace(m: Tensor) -> Tensor:
        return m / m.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=1e-30)[:, None, None]
    power = unit_trace(gram)
    for _ in range(12):
        power = unit_trace(power @ power)
    column = power.diagonal(dim1=1, dim2=2).argmax(-1)
    vector = power.gather(2, column[:, None, None].expand(-1, power.shape[1], 1))[..., 0]
    vector = vector / vector.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return vector, torch.einsum("bi,bij,bj->b", vector, gram, vector)


def _score_cam(model: nn.Module, images: Tensor, acts: Tensor, classes: Tensor, chunk_size: int,
               channels: int) -> Tensor:
    """Wang et al. 2020: weight channel k by the class probability of the image masked by map k
    (upsampled, scaled to [0,1]), minus that of the all-mean baseline. chunk_size channels at a time.

    Bounded: at most `channels` channels per image, those that fire hardest, get a forward pass; the
    rest weigh 0. The map is the sum of weight x activation, so a channel that barely fires adds little
    whatever its weight, and MobileNetV2's 1,280 channels would cost 1,280 passes an image."""
    b, c = acts.shape[:2]
    baseline = model(torch.zeros_like(images[:1])).float().softmax(1)[0]
    weights = torch.zeros(b, classes.shape[1], c, device=images.device)
    for i in range(b):
        chosen = acts[i].flatten(1).amax(1).topk(min(channels, c)).indices
        for start in range(0, len(chosen), chunk_size):
            some = chosen[start : start + chunk_size]
            masks = F.interpolate(acts[i : i + 1, some], size=images.shape[-2:], mode="bilinear",
                                  align_corners=False)[0]
            low = masks.flatten(1).amin(1)[:, None, None]
            high = masks.flatten(1).amax(1)[:, None, None]
            masks = (masks - low) / (high - low).clamp(min=EPS)
            probs = model(images[i : i + 1] * masks[:, None]).float().softmax(1)  # [chunk, classes]
            weights[i, :, some] = (probs[:, classes[i]] - baseline[classes[i]]).T
    return torch.einsum("bkc,bchw->bkhw", weights, acts.float())


def _occlusion(model, images, probs, classes, chunk_size, patch, stride) -> Tensor:
    """Zeiler & Fergus 2014: slide a grey (dataset-mean) patch over the image; each pixel's value is the
    mean drop in class probability over the patch positions that cover it. The map's cells tile the
    input (cells of gcd(stride, patch, H, W) pixels), as every other method's do, so it is resampled
    without a shift; the rim that no patch position reaches stays 0."""
    b, _, h, w = images.shape
    dev = images.device
    ys = torch.arange(0, max(h - patch, 0) + 1, stride, device=dev)
    xs = torch.arange(0, max(w - patch, 0) + 1, stride, device=dev)
    top, left = torch.cartesian_prod(ys, xs).unbind(1)  # [P] each
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    drops = torch.empty(b, classes.shape[1], top.numel(), device=dev)
    for start in range(0, top.numel(), chunk_size):
        t, lft = top[start : start + chunk_size, None], left[start : start + chunk_size, None]
        in_y = (rows >= t) & (rows < t + patch)  # [P, H]
        in_x = (cols >= lft) & (cols < lft + patch)  # [P, W]
        keep = ~(in_y[:, :, None] & in_x[:, None, :])  # [P, H, W]
        for i in range(b):
            p = model(images[i : i + 1] * keep[:, None]).float().softmax(1)[:, classes[i]]  # [P, K]
            drops[i, :, start : start + chunk_size] = (probs[i, classes[i]][None] - p).T
    cell = math.gcd(stride, patch, h, w)
    spread = torch.ones(1, 1, patch // cell, patch // cell, device=dev)  # a patch, in cells
    grid = drops.view(b * classes.shape[1], 1, ys.numel(), xs.numel())
    total = F.conv_transpose2d(grid, spread, stride=stride // cell)
    covered = F.conv_transpose2d(torch.ones_like(grid[:1]), spread, stride=stride // cell)
    mean = total / covered.clamp(min=1)
    mean = F.pad(mean, (0, w // cell - mean.shape[-1], 0, h // cell - mean.shape[-2]))  # the unreached rim
    return mean.view(b, classes.shape[1], h // cell, w // cell)


class _ModifiedReLU(torch.autograd.Function):
    """ReLU/ReLU6 forward; backward as in deconvnet (ReLU of the incoming signal) or guided
    backpropagation (that, and the forward mask)."""

    @staticmethod
    def forward(ctx, x: Tensor, upper: float, guided: bool) -> Tensor:
        ctx.save_for_backward(x)
        ctx.upper, ctx.guided = upper, guided
        return x.clamp(0, upper)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        grad = grad.clamp(min=0)
        if ctx.guided:
            grad = grad * ((x > 0) & (x < ctx.upper))
        return grad, None, None


def _pixel_views(model: nn.Module, images: Tensor, targets, top_k: int, method: str) -> Heatmaps:
    """Zeiler & Fergus 2014 deconvnet and Springenberg et al. 2015 guided backpropagation: the class
    score's signal sent back to the pixels through every ReLU module; map = max |signal| over RGB."""
    guided = method == "guided"
    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = False
            upper = 6.0 if isinstance(m, nn.ReLU6) else float("inf")
            hooks.append(m.register_forward_hook(
                lambda _m, inputs, _out, upper=upper: _ModifiedReLU.apply(inputs[0], upper, guided)))
    try:
        x = images.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            probs = logits.detach().float().softmax(1)
            classes = _resolve_targets(probs, targets, top_k)
            safe = classes.clamp(min=0)
            maps = []
            for k in range(classes.shape[1]):
                (g,) = torch.autograd.grad(logits.gather(1, safe[:, k : k + 1]).sum(), x,
                                           retain_graph=k + 1 < classes.shape[1])
                maps.append(g.abs().amax(1))
    finally:
        for h in hooks:
            h.remove()
    maps = normalise(torch.stack(maps, 1).float()) * (classes >= 0)[..., None, None]
    return Heatmaps(maps, classes, probs.gather(1, safe) * (classes >= 0), probs)
