"""The annotate job's driver: list the source, skip what is done, stream through Ray, write parts."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import os
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pyarrow.compute as pc
import ray
import torch
from tqdm import tqdm

from ..schemas.config import ConfigError, JobConfig
from ..schemas.tables import ERRORS, IMAGES
from ..workers.annotator import AnnotateSettings
from ..workers.heatmaps import HeatmapError, compute_heatmaps
from ..workers.models import load_model
from .plan import annotate_stream, plan_resources
from .signals import Stopped, stopped_by_signals
from .sources import labels_for, list_images, read_labels
from .writers import RunWriter, atomic_write_json, read_parts

log = logging.getLogger(__name__)
PACKAGES = ("camlabel", "torch", "torchvision", "ray", "pyarrow", "pycocotools", "numpy", "pillow")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def settings_of(config: JobConfig) -> AnnotateSettings:
    return AnnotateSettings(method=config.method, input_size=config.input_size, rule=config.rule,
                            threshold=config.threshold, mask_threshold=config.mask_threshold, top_k=config.top_k,
                            min_score=config.min_score, flip=config.flip, refine=config.refine,
                            precision=config.precision,
                            scales=None if config.scales is None else tuple(config.scales)).resolved()


def check_method(loaded, method: str) -> None:
    """Fail before anything starts when the method cannot run on this model (CAM on a head that is not
    GAP + linear): one tiny image through the real call, instead of every image of the run in errors."""
    probe = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))  # a flat image hides a bad head
    try:
        compute_heatmaps(loaded.model, probe, target_layer=loaded.target_layer, method=method)
    except HeatmapError as exc:
        raise ConfigError(f"method: {exc}") from None


def connect(address: str | None) -> None:
    """Join the cluster at address (or RAY_ADDRESS); without one, start a private local Ray (not a
    cluster that someone's `ray start` left running on this machine, which plain ray.init() would join).
    Ray's own notices are shown only with -v: a run prints its progress bar and one summary line."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.pop("RAY_ADDRESS", None)  # Ray refuses an empty one
    verbose = log.isEnabledFor(logging.INFO)
    if not verbose:  # read by Ray Data on each execution, here and in local workers
        quiet = importlib.resources.files(__package__).joinpath("ray_data_logging.yaml")
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(quiet))
    ray.init(address=address or "local", logging_level=logging.INFO if verbose else logging.ERROR,
             log_to_driver=True, include_dashboard=False if not address else None)
    ray.data.DataContext.get_current().enable_progress_bars = False


def series_of(loaded, settings: AnnotateSettings) -> str:
    """Runs whose results may be merged: same model, weights, layer, method and settings."""
    key = json.dumps([loaded.name, loaded.weights_sha256 or loaded.weights_source, loaded.target_layer,
                      settings.__dict__], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def list_runs(root: Path) -> list[dict]:
    """Every run under root/runs, oldest first, with its manifest."""
    runs = []
    for manifest in sorted(Path(root).glob("runs/*/manifest.json")):
        runs.append({"run": manifest.parent.name, "dir": str(manifest.parent), **json.loads(manifest.read_text())})
    return runs


def incremental_run(root: Path, series: str) -> tuple[Path, list[Path]]:
    """The run to write under root/runs (the series' unfinished run, resumed, else a new one) and the
    series' earlier runs, whose images are not annotated again."""
    mine = [r for r in list_runs(root) if r.get("series") == series]
    unfinished = [Path(r["dir"]) for r in mine if r.get("status") != "finished"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    current = unfinished[-1] if unfinished else Path(root) / "runs" / f"{stamp}-{series}"
    return current, [Path(r["dir"]) for r in mine if Path(r["dir"]) != current]


def annotate(config: JobConfig, progress: bool = True) -> dict:
    """Annotate every image of config.source not yet in the run; return the run's manifest.

    With config.incremental, config.out is a root holding runs/<run-id>/, and images already annotated
    by an earlier run of the same series (same path or same content) are skipped.
    """
    started = datetime.now(UTC).isoformat()
    model = {"name": config.model, "weights": config.weights, "class_names": config.class_names,
             "target_layer": config.target_layer, "model_dir": config.model_dir}
    loaded = load_model(**model, device="cpu")  # fails fast on a bad model, weights file or layer
    check_method(loaded, config.method)
    model["target_layer"] = loaded.target_layer
    settings = settings_of(config)
    series = series_of(loaded, settings)
    earlier: list[Path] = []
    run_dir = Path(config.out)
    if config.incremental:
        run_dir, earlier = incremental_run(run_dir, series)
    labels = read_labels(config.labels, loaded.class_names) if config.labels else None
    paths = list_images(config.source)
    writer = RunWriter(run_dir, config.rows_per_part)
    done = writer.done_paths()
    for previous in earlier:
        done |= RunWriter(previous).done_paths()
        writer.known_ids |= set(read_parts(previous / "annotations", IMAGES, ["image_id"]).column(0).to_pylist())
    todo = [p for p in paths if p not in done]
    items = []
    for p in todo:
        found = labels_for(p, config.source, labels) if labels is not None else None
        items.append({"path": p, "labels": " ".join(map(str, found)) if found is not None else "-"})
    manifest = {
        "config": config.as_dict(),
        "model": {"name": loaded.name, "weights": loaded.weights_source, "weights_sha256": loaded.weights_sha256,
                  "target_layer": loaded.target_layer, "classes": len(loaded.class_names),
                  "class_names": loaded.class_names},
        "settings": settings.__dict__,
        "versions": versions(),
        "source": config.source,
        "series": series,
        "earlier_runs": [p.name for p in earlier],
        "started": started,
        "status": "running",
    }
    atomic_write_json(run_dir / "manifest.json", manifest)
    del loaded
    start = time.perf_counter()
    if items:
        connect(config.address)
        resources = plan_resources(config.actors, config.batch_size, config.gpus_per_actor)
        manifest["resources"] = resources.__dict__
        log.info("annotating %d images (%d already done) with %s", len(items), len(done), resources)
        bar = tqdm(total=len(items), unit="img", disable=not progress, desc="annotate")
        first_at, after_first = None, 0
        try:
            with stopped_by_signals():
                for table in annotate_stream(items, model, settings, resources):
                    writer.add(table)
                    bar.update(table.num_rows)
                    if first_at is None:
                        first_at = time.perf_counter()
                    else:
                        after_first += table.num_rows
                writer.flush()
        except Stopped as stop:
            bar.close()
            writer.flush()  # the rows already received: a part of their own, committed like any other
            stop.kept = read_parts(run_dir / "annotations", IMAGES, ["path"]).num_rows + read_parts(
                run_dir / "errors", ERRORS, ["path"]).num_rows
            stop.run_dir = run_dir
            manifest.update({"status": "stopped", "stopped_by": stop.signal, "finished": datetime.now(UTC).isoformat()})
            atomic_write_json(run_dir / "manifest.json", manifest)
            raise
        bar.close()
        if after_first:  # throughput once actors are up and the model loaded, the figure that scales
            manifest["steady_images_per_second"] = round(after_first / (time.perf_counter() - first_at), 3)
    annotated = read_parts(run_dir / "annotations", IMAGES, ["path", "annotations"])
    errors = read_parts(run_dir / "errors", ERRORS, ["path"])
    manifest.update({
        "run_dir": str(run_dir),
        "status": "finished",
        "finished": datetime.now(UTC).isoformat(),
        "seconds": round(time.perf_counter() - start, 2),
        "counts": {
            "inputs": len(paths),
            "annotated": annotated.num_rows,
            "errors": errors.num_rows,
            "annotations": int(pc.sum(pc.list_value_length(annotated.column("annotations"))).as_py() or 0),
            "this_run": len(items),
        },
    })
    atomic_write_json(run_dir / "manifest.json", manifest)
    return manifest
