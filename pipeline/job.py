"""The annotate job's driver: a Ray task plans the run (list, leave out what is done), the Ray plan streams it
through the actors, which write the parts; the driver counts them."""

from __future__ import annotations

import atexit
import hashlib
import importlib.resources
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import pyarrow.compute as pc
import ray
import torch
from tqdm import tqdm

from ..schemas.config import AnnotateSettings, ConfigError, JobConfig
from ..workers.annotator import box_rule, detail_layer
from ..workers.heatmaps import HeatmapError, compute_heatmaps
from ..workers.models import load_model
from . import contents
from .lease import lease
from .plan import annotate_stream, plan_resources
from .signals import Stopped, kept_from_ray, stopped_by_signals
from .store import Location, StoreError
from .worklist import WORK_LIST, Planned, plan_work
from .writers import RunError, atomic_write_json, io_reason, provenance, read_manifest, run_counts, run_folders

log = logging.getLogger(__name__)
PLAN_CPUS = 1  # the planning task: one core for a moment (never the head, which offers none)
# lines Ray prints that no user can act on (`drop_false_alarms`): the error its C++ core logs for every Ray Data
# actor pool (ray-project/ray#57733), and the raylet's word on each actor that Ray Data itself kills as a stopped
# run shuts its pool down ("... submit failed ... The actor is dead because it was killed by `ray.kill`")
RAY_FALSE_ALARMS = (b"has constructor arguments in the object store", b"because it was killed by `ray.kill`")
LINE_WAIT = 0.05  # seconds the stderr filter waits for the rest of a line before it shows what it has
PACKAGES = ("camlabel", "torch", "torchvision", "ray", "pyarrow", "pycocotools", "numpy", "pillow")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


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
    context = ray.data.DataContext.get_current()  # this process's, read by each dataset it builds
    context.enable_progress_bars = False
    context.raise_original_map_exception = True  # an actor's OSError (a full disk) reaches us as itself
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.pop("RAY_ADDRESS", None)  # Ray refuses an empty one
    verbose = log.isEnabledFor(logging.INFO)
    if not verbose:  # read by Ray Data on each execution, here and in local workers
        quiet = importlib.resources.files(__package__).joinpath("ray_data_logging.yaml")
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(quiet))
        if "ray.data" in sys.modules:  # imported already (pipeline.plan): it read its config then, read it again
            from ray.data._internal.logging import configure_logging
            configure_logging()
    with kept_from_ray():
        ray.init(address=address or "local", logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=True, include_dashboard=False if not address else None)
    if not verbose:
        drop_false_alarms()


def drop_false_alarms() -> None:
    """Ray's C++ core logs an error in this process for every Ray Data actor pool, whose constructor
    arguments Ray Data itself keeps in the object store (ray-project/ray#57733), and a stopped run's raylet
    reports each actor Ray Data kills on its way out: false alarms no user can act on (RAY_FALSE_ALARMS). When
    stderr is the process's own (a console, not pytest's capture or a notebook's stream), fd 2, where C++ and
    Ray's log monitor write, becomes a pipe whose reader forwards everything else as it comes (a line once it
    is whole, or when its writer has paused LINE_WAIT: a progress bar is never held back). Installed
    after Ray started its processes, so none of them inherits the pipe; undone at exit, once the reader
    has forwarded the last byte."""
    if sys.stderr is not sys.__stderr__:
        return
    sys.stderr.flush()
    read, write = os.pipe()
    original, pipe = os.dup(2), os.fstat(write)
    os.dup2(write, 2)
    os.close(write)

    def forward() -> None:
        readable, partial = True, b""

        def emit(data: bytes) -> None:
            nonlocal readable
            view = memoryview(data)
            try:
                while readable and view:
                    view = view[os.write(original, view):]
            except OSError:  # e.g. `2>&1 | head` has exited: what follows is lost, as it would be unfiltered
                readable = False

        while True:  # read on even when stderr's reader has gone: writers never block
            if partial and not select.select([read], [], [], LINE_WAIT)[0]:
                emit(partial)  # a line still being written (a progress bar's): shown as it stands
                partial = b""
                continue
            chunk = os.read(read, 1 << 16)
            if not chunk:  # the pipe's last writer has gone (`restore`)
                emit(partial)
                return
            # C++ writes a log line with one write(); unbuffered Python (PYTHONUNBUFFERED) writes a printed
            # line's text and its newline apart: a line is judged once it is whole
            *lines, partial = (partial + chunk).split(b"\n")
            emit(b"".join(line + b"\n" for line in lines if not any(alarm in line for alarm in RAY_FALSE_ALARMS)))

    reader = threading.Thread(target=forward, name="camlabel-stderr", daemon=True)
    reader.start()

    def restore() -> None:
        sys.stderr.flush()
        now = os.fstat(2)
        if (now.st_dev, now.st_ino) == (pipe.st_dev, pipe.st_ino):  # nobody else has replaced it since
            os.dup2(original, 2)  # the pipe's only writer is gone: the reader drains it and stops
            reader.join(timeout=5)

    atexit.register(restore)


def series_of(loaded, settings: AnnotateSettings) -> str:
    """Runs whose results may be merged: same model, weights, layers, method, settings and box rule (a
    camlabel whose default rule or refinement changed starts a new series: its labels differ)."""
    key = json.dumps([loaded.name, loaded.weights_sha256 or loaded.weights_source, loaded.target_layer,
                      loaded.affinity_layer, detail_layer(loaded, settings), settings.__dict__,
                      asdict(box_rule(settings))], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def list_runs(root: str | Path | Location) -> list[dict]:
    """Every run under root/runs, oldest first, with its manifest; a plain run's folder holds one, itself."""
    root = Location.of(root)
    runs = run_folders(root) or ([root] if (root / "manifest.json").is_file() else [])
    return [{"run": run.name, "dir": str(run), **read_manifest(run)} for run in runs]


def incremental_run(root: Location, series: str) -> tuple[Location, list[Location]]:
    """The run to write under root/runs (the series' unfinished run, resumed, else a new one) and the
    series' earlier runs, whose images are not annotated again."""
    mine = [(root / "runs" / r["run"], r) for r in list_runs(root) if r.get("series") == series]
    unfinished = [run for run, r in mine if r.get("status") != "finished"]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    current = unfinished[-1] if unfinished else root / "runs" / f"{stamp}-{series}"
    return current, [run for run, _ in mine if run != current]


def check_kind(root: Location, incremental: bool) -> None:
    """Refuse to mix a plain run and an incremental root in one folder: neither would see the other's images
    (annotated twice), and export-coco of the folder would take the root's runs and leave the plain run out."""
    if incremental and (root / "manifest.json").is_file():
        raise ConfigError(f"out: {root} holds a run made without --incremental; resume it without --incremental, "
                          "or give --incremental another --out")
    if not incremental and run_folders(root):
        raise ConfigError(f"out: {root} is an incremental root (runs/<run-id>/); add --incremental, or give "
                          "another --out")


def check_resumable(run_dir: Location, manifest: dict) -> None:
    """A run directory holds one series: resuming it with another model, weights, layer, method, setting
    or box rule (another camlabel's default) would mix labels of two kinds under one manifest, and a plain
    run one source. Refuse, naming the first field that differs."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        return
    old = read_manifest(run_dir)
    was = old.get("source")
    # a plain run holds one source's images (an incremental root's next run may list another folder)
    plain = not manifest["config"]["incremental"]
    if plain and was and was != manifest["source"] and (os.path.isabs(was) or "://" in was):
        raise ConfigError(f"source: {run_dir} holds a run of {was!r}, not {manifest['source']!r}; resume it with "
                          "the same source, or write to another --out")
    if old.get("series") == manifest["series"]:
        return
    fields = [(f"model.{k}", old["model"].get(k), manifest["model"][k])
              for k in ("name", "weights_sha256", "target_layer", "affinity_layer")]
    fields += [(k, old.get("settings", {}).get(k), v) for k, v in json.loads(json.dumps(manifest["settings"])).items()]
    fields += [(f"rule.{k}", old.get("rule", {}).get(k), v) for k, v in manifest["rule"].items()]
    # last: it follows from the method and scales, which name the cause when they differ
    fields += [("model.detail_layer", old["model"].get("detail_layer"), manifest["model"]["detail_layer"])]
    field, was, now = next(((f, a, b) for f, a, b in fields if a != b), ("series", old.get("series"),
                                                                         manifest["series"]))
    raise ConfigError(f"{field}: {run_dir} holds a run made with {was!r}, not {now!r}; resume it with the same "
                      "settings, or write to another --out (--incremental starts a new run by itself)")


def run_manifest(config: JobConfig, loaded, settings: AnnotateSettings, earlier: list[Location]) -> dict:
    """Provenance of the run: the config, the model and its weights' hash, the settings, the versions."""
    return {
        "config": config.as_dict(),
        "model": {"name": loaded.name, "weights": loaded.weights_source, "weights_sha256": loaded.weights_sha256,
                  "target_layer": loaded.target_layer, "affinity_layer": loaded.affinity_layer,
                  "detail_layer": detail_layer(loaded, settings), "classes": len(loaded.class_names),
                  "class_names": loaded.class_names},
        "settings": settings.__dict__,
        "rule": asdict(box_rule(settings)),  # thresholds as run, the defaults included
        "versions": versions(),
        "source": config.source,
        "series": series_of(loaded, settings),
        "earlier_runs": [p.name for p in earlier],
        "started": datetime.now(UTC).isoformat(),
        "status": "running",
    }


def planned(config: JobConfig, class_names: list[str], run_dir: Location, earlier: list[Location]) -> Planned:
    """plan_work on a Ray worker; what it found that the user should know of is said in warnings. Its
    errors (a bad manifest or labels file) are raised here as they are. A run stopped meanwhile ends the task,
    so that nothing writes into the run once its lease is given up. The driver waits in Python (a Future),
    where SIGTERM's Stopped is raised plainly: raised inside ray.get, it came out as a SystemError."""
    task = ray.remote(num_cpus=PLAN_CPUS)(plan_work).remote(config, class_names, run_dir, earlier)
    try:
        plan = task.future().result()
    except ray.exceptions.RayTaskError as exc:
        raise exc.cause from None
    except Stopped:
        ray.cancel(task, force=True)
        raise
    if plan.labels_unmatched:  # those images would quietly fall back to predicted classes
        log.warning("%d file names in %s match no listed image, by path below the source or by bare file name",
                    plan.labels_unmatched, config.labels)
    if plan.left_out:  # a kind of photo no decoder here reads (.heic), or a typo'd suffix, would go unseen
        kinds = sorted(plan.left_out.items(), key=lambda kind: (-kind[1], kind[0]))
        log.warning("files left out of %s, not named as images: %s%s", config.source,
                    ", ".join(f"{suffix or 'no suffix'} {n}" for suffix, n in kinds[:5]),
                    f" and {len(kinds) - 5} more kinds" if len(kinds) > 5 else "")
    return plan


def stream_parts(todo: int, model: dict, settings: AnnotateSettings, run_dir: Location, earlier: list[Location],
                 config: JobConfig, manifest: dict, progress: bool) -> None:
    """Run the Ray plan over the work list; the actors write the parts, the driver counts them as they
    land and notes in the manifest every actor's device (cpu, or the GPU's name and CUDA version) and
    the precision `auto` resolved to."""
    resources = plan_resources(config.actors, config.batch_size, config.gpus_per_actor, config.part_size)
    manifest["resources"] = resources.__dict__
    log.info("annotating %d images with %s", todo, resources)
    bar = tqdm(total=todo, unit="img", disable=not progress, desc="annotate")
    done, busy, devices, precisions, actors, nodes = 0, 0.0, set(), set(), set(), set()
    try:
        made_by = provenance(manifest)  # before any part: without the devices and precisions the parts bring
        for status in annotate_stream(run_dir / WORK_LIST, todo, model, settings, resources, run_dir, bool(earlier),
                                      made_by):
            images = int(pc.sum(status.column("annotated")).as_py()) + int(pc.sum(status.column("errors")).as_py())
            devices.update(status.column("device").to_pylist())
            precisions.update(status.column("precision").to_pylist())
            actors.update(status.column("actor").to_pylist())
            nodes.update(status.column("node").to_pylist())
            manifest.update(devices=sorted(devices), precisions=sorted(precisions), actors=len(actors),
                            nodes=len(nodes))
            bar.update(images)
            done += images
            busy += float(pc.sum(status.column("seconds")).as_py())
    except OSError as exc:  # writing the run: a full disk, a lost mount, a store refusing a write
        raise RunError(f"{run_dir}: {io_reason(exc)}; the parts written are kept: mend it (free space, remount) "
                       "and run the same command to resume") from None
    finally:
        bar.close()
    if busy:  # throughput with the actors up and the model loaded, the figure that scales: each actor's
        # images per second of its own work (timed by itself), times the actors. Parts land in bursts, so
        # timing them as they reach the driver measured the gaps between bursts (2,300 images/s on 64)
        manifest["steady_images_per_second"] = round(done / busy * len(actors), 3)


def annotate(config: JobConfig, progress: bool = True) -> dict:
    """Annotate every image of config.source not yet in the run; return the run's manifest.

    With config.incremental, config.out is a root holding runs/<run-id>/, and images already annotated
    by an earlier run of the same series (same path or same content) are skipped.
    """
    model = {"name": config.model, "weights": config.weights, "class_names": config.class_names,
             "target_layer": config.target_layer, "model_dir": config.model_dir}
    loaded = load_model(**model, device="cpu")  # fails fast on a bad model, weights file or layer
    check_method(loaded, config.method)
    model["target_layer"] = loaded.target_layer
    config = absolute(config)  # the manifest, and the Ray task that plans the run, see where it all is
    settings = config.resolved()
    try:
        root = Location.of(config.out)
    except StoreError as exc:
        raise ConfigError(f"out: {exc}") from None
    with lease(root):
        check_kind(root, config.incremental)
        run_dir, earlier = root, []
        if config.incremental:
            run_dir, earlier = incremental_run(run_dir, series_of(loaded, settings))
        manifest = run_manifest(config, loaded, settings, earlier)
        check_resumable(run_dir, manifest)
        connect(config.address)
        check_gpus(config)
        with stopped_by_signals(), recorded_if_stopped(run_dir, manifest):  # not before: Ray sets its own
            plan = planned(config, loaded.class_names, run_dir, earlier)
            atomic_write_json(run_dir / "manifest.json", manifest)
            start = time.perf_counter()
            if plan.todo:
                stream_parts(plan.todo, model, settings, run_dir, earlier, config, manifest, progress)
            counts = {"inputs": plan.inputs, **run_counts(run_dir), "this_run": plan.todo,
                      **({"labels_unmatched": plan.labels_unmatched} if config.labels else {}),
                      **({"left_out": plan.left_out} if plan.left_out else {})}
            record_finished(run_dir, manifest, counts, time.perf_counter() - start)
    return manifest


def check_gpus(config: JobConfig) -> None:
    """Actors that want a GPU where Ray sees none wait for one to join. A private local Ray has only this
    machine's, and no node joins it: refused at once (Ray's autoscaler says so after a minute and a half, and
    waits on). A cluster's GPU nodes may still be starting (a RayJob's workers scale from zero): said, not
    refused."""
    if not config.gpus_per_actor or ray.cluster_resources().get("GPU"):
        return
    if not (config.address or os.environ.get("RAY_ADDRESS")):
        raise ConfigError(f"gpus_per_actor: {config.gpus_per_actor} GPU an actor, but Ray sees no GPU on this "
                          "machine; leave it out to annotate on the CPU cores, or give --address a cluster with GPUs")
    log.warning("the Ray cluster has no GPU yet: the annotate actors wait for a GPU node to join")


def record_finished(run_dir: Location, manifest: dict, counts: dict, seconds: float) -> None:
    """The run's plans go and its manifest says `finished`, with its counts: last, so that a run whose driver
    died before it is resumed, not taken for whole."""
    for plan in (WORK_LIST, contents.HASHES, contents.IMAGES):
        (run_dir / plan).unlink()
    manifest.update({"run_dir": str(run_dir), "status": "finished", "finished": datetime.now(UTC).isoformat(),
                     "seconds": round(seconds, 2), "counts": counts})
    atomic_write_json(run_dir / "manifest.json", manifest)


@contextmanager
def recorded_if_stopped(run_dir: Location, manifest: dict) -> Iterator[None]:
    """A run stopped within, while planning or annotating, keeps every part the actors finished: its manifest
    says `stopped`, and Stopped carries how many images are kept and where."""
    try:
        yield
    except Stopped as stop:
        counts = run_counts(run_dir)
        stop.kept, stop.run_dir = counts["annotated"] + counts["errors"], run_dir
        manifest.update({"status": "stopped", "stopped_by": stop.signal, "finished": datetime.now(UTC).isoformat()})
        atomic_write_json(run_dir / "manifest.json", manifest)
        raise


def absolute(config: JobConfig) -> JobConfig:
    """config with its local source, labels and out paths made absolute: a Ray worker plans the run, in a
    working directory of its own."""
    def local(path: str | None) -> str | None:
        return path if path is None or "://" in path else os.path.abspath(path)

    return replace(config, source=local(config.source), labels=local(config.labels), out=local(config.out))
