"""`camlabel train`: fine-tune a classifier into a GAP localizer on image-level labels.

The result is a MODEL_DIR (localizer.json, model.safetensors, classes.txt) that `camlabel annotate
--model-dir` uses as it is. One process, on the GPU when there is one; the loop is a plain function of
its config so Ray Train's TorchTrainer can run it on many GPUs where a cluster is available.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from ..schemas.config import ConfigError, UserError
from ..workers.decode import DecodeError, decode, read_bytes
from ..workers.localizer import GapLocalizer, localizer_loss
from ..workers.models import LOCALIZER_FILE, LOCALIZER_WEIGHTS, ModelError, load_model
from ..workers.preprocess import IMAGENET_MEAN, IMAGENET_STD
from .sources import SourceError, labels_column, list_images, read_labels, unmatched_names
from .writers import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    images: str
    out: str
    labels: str | None = None  # None: one folder per class under images
    backbone: str = "mobilenet_v2"
    weights: str | None = "bundled"  # None: random init
    epochs: int = 6
    ggam: float = 0.0  # lambda of the Grad-CAM guided attention loss; > 0 adds the attention module
    batch_size: int = 16
    input_size: int = 224
    lr: float = 3e-4  # the new head's (AdamW); the trunk learns at a tenth of it
    val_fraction: float = 0.1
    width: int = 1024
    seed: int = 0
    workers: int = 1  # > 1: Ray Train's TorchTrainer, data-parallel, one GPU (else one CPU process) each
    address: str | None = None  # Ray cluster for workers > 1 (default: RAY_ADDRESS, else a local Ray)

    def validate(self) -> TrainConfig:
        def fail(field: str, allowed: str) -> None:
            raise ConfigError.refused(field, getattr(self, field), allowed)

        for name in ("epochs", "batch_size", "width", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "an integer >= 1")
        if not 32 <= self.input_size <= 1024:
            fail("input_size", "an integer from 32 to 1024")
        if not 0 <= self.ggam <= 100:
            fail("ggam", "a weight from 0 (off) to 100")
        if not 0 < self.lr < 1:
            fail("lr", "a learning rate between 0 and 1")
        if not 0 <= self.val_fraction < 1:
            fail("val_fraction", "a fraction from 0 to below 1")
        if self.labels is not None and not Path(self.labels).is_file():
            fail("labels", "a CSV file with columns file_name, labels")
        return self


def labelled_images(images: str, labels: str | None, class_names: list[str]
                    ) -> tuple[list[str], list[list[int]], list[str]]:
    """(paths, each path's label indices into classes, classes) for the images that have labels.

    A CSV whose labels the backbone knows (its class names or indices) keeps the backbone's classes, so
    the localizer's category ids and names are the base model's; a CSV of other names is its own
    vocabulary. Without a CSV, each image's top folder under `images` is its class.
    """
    paths = list_images(images)
    if labels is not None:
        try:
            table = read_labels(labels, class_names, images)
        except SourceError:
            class_names = sorted({t for names in _label_tokens(labels) for t in names})
            table = read_labels(labels, class_names, images)
        listed = pa.array(paths, pa.string())
        found = labels_column(listed, images, table).to_pylist()
        unmatched = unmatched_names(listed, images, table)
        if unmatched:
            log.warning("%d file names in %s match no image under %s", unmatched, labels, images)
    else:
        folders = [PurePosixPath(os.path.relpath(p, images)).parts for p in paths]
        class_names = sorted({parts[0] for parts in folders if len(parts) > 1})
        index = {name: i for i, name in enumerate(class_names)}
        found = [[index[parts[0]]] if len(parts) > 1 else None for parts in folders]
    kept = [(p, f) for p, f in zip(paths, found, strict=True) if f]
    if not kept:
        raise SourceError(f"no labelled images under {images}: give --labels CSV or one folder per class")
    if len(class_names) < 2:  # a softmax over one class is 1 whatever the image: nothing to learn
        raise SourceError(f"{labels or images}: one class ({', '.join(class_names)}); a localizer learns to tell "
                          "two or more apart")
    return [p for p, _ in kept], [f for _, f in kept], list(class_names)


def _label_tokens(path: str) -> list[list[str]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [(row.get("labels") or "").split() for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read labels {path}: {exc}") from None


class LabelledImages(Dataset):
    """Decoded, augmented images and their target distributions; an unreadable image yields None."""

    def __init__(self, paths: list[str], labels: list[list[int]], num_classes: int, transform) -> None:
        self.paths, self.labels, self.num_classes, self.transform = paths, labels, num_classes, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = decode(read_bytes(self.paths[i]))
        except (OSError, DecodeError) as exc:
            log.warning("skipping %s: %s", self.paths[i], exc)
            return None
        target = torch.zeros(self.num_classes)
        target[self.labels[i]] = 1.0 / len(self.labels[i])
        return self.transform(image), target


def _collate(items):
    items = [x for x in items if x is not None]
    if not items:
        return None
    return torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items])


def _transforms(size: int) -> tuple[v2.Compose, v2.Compose]:
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                        *tail])
    val = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), *tail])
    return train, val


def _relative(path: str, root: str) -> str:
    return path if "://" in path else os.path.relpath(path, root)


def _in_validation(path: str, fraction: float) -> bool:
    """A split fixed by the hash of the path under the images root: the same images validate on every
    run, machine and copy of the data."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Fine-tune and write config.out; returns what localizer.json records."""
    config.validate()
    if config.workers > 1:
        return _train_on_ray(config)
    return save_localizer(Path(config.out), *_train_loop(config, progress))


def _train_on_ray(config: TrainConfig) -> dict:
    """The same loop under Ray Train: DDP across workers, the model comes back as a checkpoint. On a
    cluster of several nodes, --out's parent must be storage every node sees (it holds Ray's run folder)."""
    import ray
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .job import connect

    _setup(config, torch.device("cpu"))  # a bad setting in one line here, not in every worker's traceback
    connect(config.address)
    out = Path(config.out).resolve()
    storage = out.parent / ".camlabel-train"
    run = f"{out.name}-{uuid.uuid4().hex[:8]}"  # Ray Train resumes a run folder of the same name: never an old one
    level = logging.getLevelName(log.getEffectiveLevel())  # Ray Train's notices and the epochs' lines: -v only
    trainer = TorchTrainer(
        _ray_worker, train_loop_config={"config": asdict(config), "log_level": level},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=bool(ray.cluster_resources().get("GPU"))),
        run_config=RunConfig(name=run, storage_path=str(storage), logging_config=LoggingConfig(log_level=level)))
    try:
        result = _fitted(trainer)
        out.mkdir(parents=True, exist_ok=True)
        with result.checkpoint.as_directory() as folder:
            for name in (LOCALIZER_WEIGHTS, "classes.txt", LOCALIZER_FILE):  # the spec last: a folder with it is whole
                atomic_write_bytes(out / name, (Path(folder) / name).read_bytes())
    except ray.train.WorkerGroupError as exc:
        raise _as_user_error(exc) from None
    finally:
        shutil.rmtree(storage / run, ignore_errors=True)
        with contextlib.suppress(OSError):
            storage.rmdir()  # unless another training is using it
    return json.loads((out / LOCALIZER_FILE).read_text())


def _as_user_error(failed: Exception) -> Exception:
    """A Ray Train failure whose workers raised a UserError (images only the workers read, none readable): that
    one line, not the group's tracebacks."""
    return next((e for e in getattr(failed, "worker_failures", {}).values() if isinstance(e, UserError)), failed)


def _fitted(trainer):
    """trainer.fit(), waited for in Python: inside fit's ray.get, SIGTERM's Stopped waited for the training's
    end and came out a SystemError (the model was written, exit 0). A stopped driver's exit ends the actors."""
    done = Future()

    def fit() -> None:
        try:
            done.set_result(trainer.fit())
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=fit, name="ray-train-fit", daemon=True).start()
    return done.result()


def _ray_worker(values: dict) -> None:
    import ray.train

    logging.getLogger().setLevel(values["log_level"])  # Ray Train set INFO: each report and epoch a line
    config = TrainConfig(**values["config"])
    model, config, base, classes, history = _train_loop(config, progress=False, distributed=True)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_localizer(Path(folder), model.module, config, base, classes, history)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(history[-1], checkpoint=checkpoint)


def _setup(config: TrainConfig, device: torch.device):
    """(base model, localizer to train, image paths, their labels, class names); a bad backbone, weights or
    image folder is a ModelError or SourceError here, before any training."""
    base = load_model(config.backbone, weights=config.weights, device=device)
    paths, labels, classes = labelled_images(config.images, config.labels, base.class_names)
    try:
        model = GapLocalizer.from_classifier(base.model, base.target_layer, len(classes), width=config.width,
                                             attention=config.ggam > 0).to(device)
    except ValueError as exc:
        raise ModelError(f"backbone {config.backbone}: {exc}") from exc
    return base, model, paths, labels, classes


def _train_loop(config: TrainConfig, progress: bool, distributed: bool = False):
    """The training itself: (model, config, base model, classes, per-epoch history)."""
    torch.manual_seed(config.seed)
    if distributed:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, model, paths, labels, classes = _setup(config, device)
    train_tf, val_tf = _transforms(config.input_size)
    held_out = [_in_validation(_relative(p, config.images), config.val_fraction) for p in paths]
    subset = [[i for i, h in enumerate(held_out) if h == want] for want in (False, True)]
    train_set, val_set = (LabelledImages([paths[i] for i in idx], [labels[i] for i in idx], len(classes), tf)
                          for idx, tf in zip(subset, (train_tf, val_tf), strict=True))
    workers = min(4, (os.cpu_count() or 1) - 1) if device.type == "cuda" else 0
    loader = DataLoader(train_set, config.batch_size, shuffle=True, collate_fn=_collate, num_workers=workers,
                        drop_last=len(train_set) > config.batch_size)
    val_loader = DataLoader(val_set, config.batch_size, collate_fn=_collate, num_workers=workers)
    trunk = list(model.trunk.parameters())
    head = [p for n, p in model.named_parameters() if not n.startswith("trunk.")]
    optimizer = torch.optim.AdamW([{"params": trunk, "lr": config.lr / 10}, {"params": head, "lr": config.lr}],
                                  weight_decay=1e-4)
    if distributed:  # DistributedDataParallel, and each worker reads its own share of the images
        model = ray.train.torch.prepare_model(model)
        loader, val_loader = (ray.train.torch.prepare_data_loader(x) for x in (loader, val_loader))
    steps = config.epochs * max(1, len(loader))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    log.info("training on %d images (%d validate), %d classes, %s", len(train_set), len(val_set), len(classes), device)
    history = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        totals = torch.zeros(3)  # loss sum, correct, images
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=not progress)
        for batch in bar:
            if batch is None:
                continue
            images, targets = batch[0].to(device), batch[1].to(device)
            loss, logits = localizer_loss(model, images, targets, config.ggam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            totals += torch.tensor([loss.item() * len(images), _correct(logits, targets), len(images)])
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.3f}", acc=f"{totals[1] / totals[2]:.3f}")
        if epoch == 1:
            _check_read(totals[2], len(train_set), config, device if distributed else None)
        seen = totals[2].clamp(min=1)
        record = {"epoch": epoch, "train_images": int(totals[2]), "train_loss": round(float(totals[0] / seen), 4),
                  "train_accuracy": round(float(totals[1] / seen), 4), **_validate(model, val_loader, device)}
        log.info("epoch %d: %s", epoch, record)
        history.append(record)
        if distributed and epoch < config.epochs:
            ray.train.report(record)
    return model, config, base, classes, history


def _check_read(read: torch.Tensor, listed: int, config: TrainConfig, ddp_device: torch.device | None) -> None:
    """A training that read no image learns nothing: refused, where it wrote a model of its random head. Under
    DDP the workers' counts are summed on their device (NCCL reduces CUDA tensors only)."""
    if ddp_device is not None:
        read = read.to(ddp_device, copy=True)  # a copy: the epoch's record keeps this worker's own count
        torch.distributed.all_reduce(read)
    if listed and not read:
        raise SourceError(f"{config.labels or config.images}: none of the training images could be read "
                          "(each is named above)")


def _correct(logits: torch.Tensor, targets: torch.Tensor) -> int:
    """Images whose top prediction is one of their labels."""
    return int(targets.gather(1, logits.argmax(1, keepdim=True)).gt(0).sum())


@torch.no_grad()
def _validate(model: GapLocalizer, loader: DataLoader, device: torch.device) -> dict:
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch[0].to(device), batch[1].to(device)
        logits = model(images)
        loss += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        correct += _correct(logits, targets)
        count += len(images)
    if not count:
        return {}
    return {"val_loss": round(loss / count, 4), "val_accuracy": round(correct / count, 4)}


def save_localizer(out: Path, model: GapLocalizer, config: TrainConfig, base, classes: list[str],
                   history: list[dict]) -> dict:
    """Write MODEL_DIR: weights (safetensors, atomically), classes.txt, and localizer.json last, so a
    folder with a localizer.json is always complete."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    os.close(fd)
    save_file(state, tmp)
    os.replace(tmp, out / LOCALIZER_WEIGHTS)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    spec = {
        "backbone": config.backbone,
        "trunk_layer": base.target_layer,
        "base_weights": base.weights_source,
        "base_weights_sha256": base.weights_sha256,
        "classes": classes,
        "width": config.width,
        "attention": config.ggam > 0,
        "config": asdict(config),
        "history": history,
    }
    atomic_write_json(out / LOCALIZER_FILE, spec)
    return spec
