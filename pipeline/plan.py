"""The Ray Data plan, top to bottom: read the paths, read and decode the bytes, annotate on actors.

With GPUs, CPU tasks decode while the GPU actors annotate. Without, each actor decodes its own batch:
handing decoded pixels from one process to another through the object store costs more than decoding
them on the core that then annotates them (bench/README.md measures both).

The annotate actors write each batch's rows as a Parquet part themselves, atomically, under a name
fixed by the batch's paths (a retried batch rewrites the same part), and the driver (pipeline.job)
receives only each part's counts: no image row passes through it, and a crash loses at most the
batches in flight.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from ..schemas.config import AnnotateSettings
from ..workers.actor import AnnotateActor, decode_batch
from .writers import write_part

log = logging.getLogger(__name__)
DECODE_CPUS = 0.1  # reservation of a decode task: decoding is a few percent of the model's work
GPU_BATCH = 32  # images per batch (and per part) on a GPU: enough to fill it at 448 px with MobileNetV2
CPU_BATCH = 8  # on one CPU thread a batch takes seconds: small batches keep a crash's loss small


@dataclass(frozen=True)
class Resources:
    """What each annotate actor holds; chosen from the cluster unless the user says."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int
    decoders: int  # decode tasks at once: one per core (their 0.1 CPU reservation alone would allow ten)
    decode_stage: bool  # decode in tasks of their own (GPU actors), else in the annotate actors


def plan_resources(actors: int | None, batch_size: int | None, gpus_per_actor: float | None = None) -> Resources:
    """One actor per GPU when the cluster has GPUs, fed by decode tasks; otherwise one per CPU core,
    each with one torch thread, decoding its own batches."""
    cluster = ray.cluster_resources()
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    if gpus_per_actor:
        count = actors or max(1, int(gpus / gpus_per_actor))
        return Resources(count, gpus_per_actor, 1.0, batch_size or GPU_BATCH, cpus, decode_stage=True)
    count = actors or cpus
    return Resources(count, 0.0, min(1.0, cpus / count), batch_size or CPU_BATCH, cpus, decode_stage=False)


def shortest_needed(settings: AnnotateSettings) -> int:
    """The shorter side the largest input scale resizes an image to: decoding finer gains nothing."""
    resolved = settings.resolved()
    return math.ceil(resolved.input_size * max(resolved.scales))


def mark_duplicates(batch: dict, annotated_before: dict[str, str]) -> dict:
    """Images whose content an earlier run of the series annotated become error rows that name the
    earlier image (stage "duplicate"): never annotated twice, never silently dropped."""
    batch = {k: list(v) for k, v in batch.items()}  # numpy string columns would truncate a longer reason
    for i, digest in enumerate(batch["image_id"]):
        if not batch["error"][i] and digest in annotated_before:
            batch["error_stage"][i] = "duplicate"
            batch["error"][i] = f"same content as {annotated_before[digest]}, annotated by an earlier run"
    return batch


class AnnotateAndWrite:
    """The annotate stage: an AnnotateActor (decoding its own batches when there is no decode stage)
    that writes each batch's rows as a part itself and returns only the part's counts."""

    def __init__(self, model: dict, settings: AnnotateSettings, run_dir: str, decodes: bool,
                 annotated_before: dict[str, str]) -> None:
        self.actor = AnnotateActor(model, settings)
        self.run_dir, self.decodes, self.annotated_before = Path(run_dir), decodes, annotated_before
        self.shortest = shortest_needed(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        batch = decode_batch(batch, self.shortest) if self.decodes else batch
        batch = mark_duplicates(batch, self.annotated_before)
        return pa.Table.from_pylist([{**write_part(self.run_dir, self.actor(batch)), "device": self.actor.device}])


def annotate_stream(
    items: pa.Table,
    model: dict,
    settings: AnnotateSettings,
    resources: Resources,
    run_dir: Path,
    annotated_before: dict[str, str],
) -> Iterator[pa.Table]:
    """items: a table of path and labels ("i j", or "-" for none) -> parts under run_dir, and a stream of
    their counts (tables of {"part", "annotated", "errors", "annotations", "device"})."""
    blocks = max(1, min(len(items), max(len(items) // resources.batch_size, 2 * resources.actors)))
    size = -(-len(items) // blocks)
    ds = ray.data.from_arrow([items.slice(start, size) for start in range(0, len(items), size)])
    if resources.decode_stage:
        ds = ds.map_batches(decode_batch, batch_size=resources.batch_size, num_cpus=DECODE_CPUS,
                            concurrency=resources.decoders, fn_kwargs={"shortest": shortest_needed(settings)})
    ds = ds.map_batches(
        AnnotateAndWrite,
        fn_constructor_kwargs={"model": model, "settings": settings, "run_dir": str(run_dir),
                               "decodes": not resources.decode_stage, "annotated_before": annotated_before},
        batch_size=resources.batch_size,
        batch_format="numpy",
        num_gpus=resources.gpus_per_actor,
        num_cpus=resources.cpus_per_actor,
        compute=ray.data.ActorPoolStrategy(size=resources.actors),  # Ray Data restarts a dead actor and
    )  # retries its batch (max_restarts and max_task_retries default to -1 for actor pools)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
