"""The annotate actor's work: read and decode a batch of paths (`decode_batch`), then one model on one
device turns the decoded images into Arrow rows (`AnnotateActor`)."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pyarrow as pa
import torch

from ..schemas.config import AnnotateSettings
from ..schemas.tables import RESULTS
from .annotator import Annotator, shape_key
from .decode import DecodeError, decode_reduced, read_bytes
from .models import load_model

log = logging.getLogger(__name__)


class AnnotateActor:
    """Loads the model once; each call annotates one part (columns of the decode stage), batch_size images
    at a time."""

    def __init__(self, model: dict, settings: AnnotateSettings, batch_size: int = 8) -> None:
        _refuse_unusable_gpus()
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # one actor per core, one thread each: no OpenMP oversubscription
        self.loaded = load_model(**model)
        self.annotator = Annotator(self.loaded, settings)
        self.method = settings.method
        self.batch_size = batch_size
        self.device = device_name(self.loaded.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["path"])
        ok = [i for i in range(n) if not batch["error"][i]]
        rows = {name: [None] * n for name in RESULTS.names}
        for name in ("image_id", "path", "width", "height", "error_stage", "error"):
            rows[name] = [_plain(v) for v in batch[name]]
        for i in range(n):
            rows["error_stage"][i] = rows["error_stage"][i] or None
            rows["error"][i] = rows["error"][i] or None
        if ok:
            self._annotate(batch, ok, rows)
        return pa.Table.from_pydict(rows, schema=RESULTS)

    def _annotate(self, batch, ok: list[int], rows: dict) -> None:
        """Images with labels and images without are annotated in separate model batches, each of as few
        shape groups as the part allows: a group is one set of passes (a GPU ran 7 for 8 images taken
        as they came), and an image's labels do not depend on its batch mates (without labels its scores
        move by about 1e-6: a group's crops are named in one pass). A batch that fails is
        retried one image at a time so only the image at fault becomes an error row."""
        labels = {i: _parse_labels(batch["labels"][i]) for i in ok}
        shape = {i: shape_key(*np.shape(batch["image"][i])[:2], self.annotator.settings.input_size) for i in ok}
        ok = sorted(ok, key=shape.__getitem__)
        for kind in ([i for i in ok if labels[i] is not None], [i for i in ok if labels[i] is None]):
            for group in (kind[start : start + self.batch_size] for start in range(0, len(kind), self.batch_size)):
                self._record_or_isolate(group, labels, batch, rows)

    def _record_or_isolate(self, group: list[int], labels: dict, batch, rows: dict) -> None:
        try:
            self._record(group, labels, batch, rows)
        except Exception:
            log.exception("batch of %d failed; retrying one image at a time", len(group))
            for i in group:
                try:
                    self._record([i], labels, batch, rows)
                except Exception as exc:
                    rows["error_stage"][i], rows["error"][i] = "annotate", f"{type(exc).__name__}: {exc}"

    def _record(self, group: list[int], labels: dict, batch, rows: dict) -> None:
        images = [torch.from_numpy(np.array(batch["image"][i])).permute(2, 0, 1) for i in group]
        given = labels[group[0]] is not None
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in group]  # original, however decoded
        result = self.annotator(images, [labels[i] for i in group] if given else None, sizes)
        names = self.loaded.class_names
        for j, i in enumerate(group):
            rows["label_source"][i] = "labels" if given else "predicted"
            rows["top_classes"][i] = result.top_classes[j].tolist()
            rows["top_scores"][i] = result.top_scores[j].tolist()
            rows["method"][i] = self.method
            rows["precision"][i] = self.annotator.precision
            rows["device"][i] = self.device
            rows["annotations"][i] = [
                {"category_id": p.class_index + 1, "class_name": names[p.class_index], "bbox": p.bbox,
                 "score": p.score, "area": p.area, "rle_counts": p.rle["counts"],
                 "runner_ups": [{"category_id": c + 1, "class_name": names[c], "score": score}
                                for c, score in p.runner_ups]}
                for p in result.labels[j]]
            rows["heatmaps"][i] = stored_heatmaps(result.maps[j], result.classes[j])


def decode_batch(batch: dict[str, np.ndarray], shortest: int) -> dict[str, list]:
    """Read each path's bytes and decode them, large JPEGs straight to about `shortest` px on their
    shorter side (width and height stay the original's); a failure becomes an error row, never an
    exception."""
    out: dict[str, list] = {k: [] for k in ("path", "labels", "image_id", "width", "height", "image",
                                            "error_stage", "error")}
    for path, labels in zip(batch["path"], batch["labels"], strict=True):
        stage, error, image, digest, size = "read", "", np.zeros((1, 1, 3), np.uint8), "", (0, 0)
        try:
            data = read_bytes(str(path))
            digest = hashlib.sha256(data).hexdigest()
            stage = "decode"
            pixels, size = decode_reduced(data, shortest)
            image = pixels.permute(1, 2, 0).numpy()
        except (OSError, DecodeError) as exc:
            error = str(exc) if isinstance(exc, DecodeError) else f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a decoder bug must not take the job down
            error = f"{type(exc).__name__}: {exc}"
        else:
            stage = ""
        for key, value in zip(out, (str(path), labels, digest, size[0], size[1], image, stage, error), strict=True):
            out[key].append(value)
    return out


def device_name(device: torch.device) -> str:
    """"cpu", or "cuda:<GPU name> (CUDA <version>)": what every row records of where it was computed."""
    if device.type != "cuda":
        return device.type
    return f"cuda:{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"


def _refuse_unusable_gpus() -> None:
    """An actor that Ray gave a GPU must use it: on a node whose CUDA is unusable (a driver too old for
    this torch build, a CPU-only image) it would otherwise crawl along on one CPU thread, unnoticed."""
    import ray

    gpus = ray.get_gpu_ids() if ray.is_initialized() else []
    if not gpus or torch.cuda.is_available():
        return
    try:
        torch.cuda.init()
        reason = "torch.cuda.is_available() is False"
    except Exception as exc:  # torch says why: no driver, a driver too old, no device visible
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise RuntimeError(f"Ray gave this actor GPU {gpus} but CUDA is unusable here ({reason}; torch "
                       f"{torch.__version__}, built for CUDA {torch.version.cuda}): fix the node's driver or "
                       "image, or run without GPUs")


STORED_MAP_SIDE = 64  # the heatmaps kept in each row (float16): enough for export-masks' label maps, ~8 KB


def stored_heatmaps(maps: torch.Tensor, classes: torch.Tensor, max_side: int = STORED_MAP_SIDE) -> list[dict]:
    """maps [K,h,w] -> float16 records, shrunk (area average) to at most max_side per side."""
    h, w = maps.shape[-2:]
    scale = min(1.0, max_side / max(h, w, 1))
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    small = torch.nn.functional.interpolate(maps[None].float(), size=size, mode="area")[0].half().cpu()  # one copy
    return [{"category_id": int(c) + 1, "height": size[0], "width": size[1], "values": small[k].numpy().tobytes()}
            for k, c in enumerate(classes.tolist()) if c >= 0]


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _parse_labels(text) -> list[int] | None:
    """The decode stage passes labels as 'i j k'; None means 'no labels: use predicted classes'."""
    if text is None or text == "-":
        return None
    return [int(t) for t in str(text).split()]
