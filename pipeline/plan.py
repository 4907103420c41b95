"""The Ray Data plan, top to bottom: read the work list, read and decode the bytes, annotate on actors.

With GPUs, CPU tasks decode while the GPU actors annotate. Without, each actor decodes its own batch:
handing decoded pixels from one process to another through the object store costs more than decoding
them on the core that then annotates them (bench/README.md measures both).

The annotate actors take a part's images at a time (several model batches) and write its rows as one
Parquet file themselves, atomically, under a name fixed by the part's paths (a retried part rewrites the
same file), and the driver (pipeline.job) receives only each part's counts: no image row passes through
it, and a crash loses at most the parts in flight.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..schemas.config import AnnotateSettings
from ..workers.actor import AnnotateActor, decode_batch
from .contents import EarlierContents
from .store import Location
from .writers import write_part

log = logging.getLogger(__name__)
DECODE_CPUS = 0.1  # reservation of a decode task: decoding is a few percent of the model's work
GPU_BATCH = 32  # images the model takes at once on a GPU: enough to fill it at 448 px with MobileNetV2
CPU_BATCH = 8  # on one CPU thread: more gains nothing
GPU_PART = 256  # images per part on a GPU: seconds of its work, a few MB of Parquet
CPU_PART = 32  # on one CPU core about a minute of work, the most a crash should lose
MAX_BLOCKS = 10_000  # blocks of the work list planned at once: the driver's memory is bounded at any size


@dataclass(frozen=True)
class Resources:
    """What each annotate actor holds; chosen from the cluster unless the user says."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int  # images per model call
    part_size: int  # images per Ray Data batch and per part: the unit a crash loses and a retry redoes
    decoders: int  # decode tasks at once: one per core (their 0.1 CPU reservation alone would allow ten)
    decode_stage: bool  # decode in tasks of their own (GPU actors), else in the annotate actors
    grows: bool = False  # the pool takes nodes that join during the run (the user did not fix `actors`)


def plan_resources(actors: int | None, batch_size: int | None, gpus_per_actor: float | None = None,
                   part_size: int | None = None) -> Resources:
    """One actor per GPU when the cluster has GPUs, fed by decode tasks; otherwise one per CPU core,
    each with one torch thread, decoding its own batches. Parts are never smaller than a batch."""
    cluster = ray.cluster_resources()
    gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if gpus else 0.0
    if gpus_per_actor:
        count = actors or max(1, int(gpus / gpus_per_actor))
        batch = batch_size or GPU_BATCH
        return Resources(count, gpus_per_actor, 1.0, batch, max(batch, part_size or GPU_PART), cpus,
                         decode_stage=True, grows=actors is None)
    count = actors or cpus
    batch = batch_size or CPU_BATCH
    return Resources(count, 0.0, min(1.0, cpus / count), batch, max(batch, part_size or CPU_PART), cpus,
                     decode_stage=False, grows=actors is None)


def shortest_needed(settings: AnnotateSettings) -> int:
    """The shorter side the largest input scale resizes an image to: decoding finer gains nothing."""
    resolved = settings.resolved()
    return math.ceil(resolved.input_size * max(resolved.scales))


def mark_duplicates(batch: dict, earlier: EarlierContents) -> dict:
    """Images whose content an earlier run of the series annotated become error rows that name the
    earlier image (stage "duplicate"): never annotated twice, never silently dropped."""
    batch = {k: list(v) for k, v in batch.items()}  # numpy string columns would truncate a longer reason
    for i, path in enumerate(earlier.earlier_paths(batch["image_id"])):
        if path is not None and not batch["error"][i]:
            batch["error_stage"][i] = "duplicate"
            batch["error"][i] = f"same content as {path}, annotated by an earlier run"
    return batch


class AnnotateAndWrite:
    """The annotate stage: an AnnotateActor (decoding its own parts when there is no decode stage) that
    writes each part's rows itself and returns only the part's counts. With earlier runs, each actor maps
    the index of their contents that planning wrote (pipeline.contents)."""

    def __init__(self, model: dict, settings: AnnotateSettings, batch_size: int, run_dir: Location, decodes: bool,
                 earlier: bool, made_by: dict | None = None) -> None:
        self.actor = AnnotateActor(model, settings, batch_size)
        self.run_dir, self.decodes = run_dir, decodes
        self.made_by = None if made_by is None else {  # with this actor's device and precision, in every part
            **made_by, "devices": [self.actor.device], "precisions": [self.actor.annotator.precision]}
        self.earlier = EarlierContents(run_dir) if earlier else None
        self.shortest = shortest_needed(settings)
        where = ray.get_runtime_context() if ray.is_initialized() else None
        self.actor_id, self.node_id = (where.get_actor_id(), where.get_node_id()) if where else (None, None)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        start = time.perf_counter()
        batch = decode_batch(batch, self.shortest) if self.decodes else batch
        batch = mark_duplicates(batch, self.earlier) if self.earlier else batch
        counts = write_part(self.run_dir, self.actor(batch), self.made_by)
        where = {"device": self.actor.device, "precision": self.actor.annotator.precision,
                 "actor": self.actor_id, "node": self.node_id}
        return pa.Table.from_pylist([{**counts, **where, "seconds": time.perf_counter() - start}])


class WorkList(Datasource):
    """The run's work list (path and labels of each image to do, a Parquet file the planning task wrote)
    read in row ranges: the driver holds the ranges, never the paths. Its read tasks ask for no CPU:
    on CPU machines the annotate actors hold every core."""

    def __init__(self, path: Location, rows: int, block_rows: int) -> None:
        self.path, self.rows, self.block_rows = path, rows, block_rows

    def estimate_inmemory_data_size(self) -> None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        return [ReadTask(partial(read_rows, self.path, start, min(start + self.block_rows, self.rows)),
                         BlockMetadata(num_rows=min(self.block_rows, self.rows - start), size_bytes=None,
                                       exec_stats=None, input_files=None))
                for start in range(0, self.rows, self.block_rows)]


def read_rows(path: Location, start: int, stop: int) -> list[pa.Table]:
    """Rows [start, stop) of a Parquet file, reading only the row groups that hold them."""
    file = pq.ParquetFile(path.path, filesystem=path.fs)
    groups, first, offset = [], None, 0
    for i in range(file.num_row_groups):
        rows = file.metadata.row_group(i).num_rows
        if offset < stop and offset + rows > start:
            groups.append(i)
            first = offset if first is None else first
        offset += rows
    return [file.read_row_groups(groups).slice(start - first, stop - start)] if groups else []


def actor_pool(resources: Resources, blocks: int) -> ray.data.ActorPoolStrategy:
    """The annotate actors for `blocks` parts: as many as the cluster holds now (none idle in a tiny run),
    more as nodes join (up to one per part) unless the user fixed the number.

    Ray Data queues a second part on an actor (its default, two in flight): on a GPU actor that part waits
    already decoded, so the GPU never waits for one, and a growing pool needs the queue, since Ray Data
    adds actors only when the queues are long. In a fixed pool of actors that decode their own parts,
    the queue only idles another actor: two actors given two parts often had one hold both (a 64-image
    job took 90 s, not 54), so there each holds one part at a time."""
    start = min(resources.actors, blocks)
    one_at_a_time = not resources.grows and not resources.decode_stage
    return ray.data.ActorPoolStrategy(min_size=1 if resources.grows else start,
                                      max_size=blocks if resources.grows else start, initial_size=start,
                                      max_tasks_in_flight_per_actor=1 if one_at_a_time else 2)


def annotate_stream(
    work_list: Path | Location,
    count: int,
    model: dict,
    settings: AnnotateSettings,
    resources: Resources,
    run_dir: Path | Location,
    earlier: bool,
    made_by: dict | None = None,
) -> Iterator[pa.Table]:
    """work_list: a Parquet file of the `count` images to annotate, columns path and labels ("i j", or
    "-" for none) -> parts under run_dir, and a stream of their counts (tables of {"part", "annotated",
    "errors", "annotations", "device", "precision", "actor", "node", "seconds": the part's decode, annotate
    and write time}). earlier: whether earlier runs of the series exist (planning indexed their contents in
    run_dir). made_by: the run's provenance, which each part's footer holds with its actor's device and
    precision (`pipeline.writers.provenance`). Blocks of about a part, so that every actor gets work, and at
    most MAX_BLOCKS of them: the driver's plan has the same size for any collection."""
    blocks = max(1, min(count, max(count // resources.part_size, 2 * resources.actors), MAX_BLOCKS))
    # one read task at a time: reads take milliseconds
    work = WorkList(Location.of(work_list), count, -(-count // blocks))
    ds = ray.data.read_datasource(work, num_cpus=0, concurrency=1, override_num_blocks=blocks)
    if resources.decode_stage:
        ds = ds.map_batches(decode_batch, batch_size=resources.batch_size, num_cpus=DECODE_CPUS,
                            concurrency=resources.decoders, fn_kwargs={"shortest": shortest_needed(settings)})
    ds = ds.map_batches(
        AnnotateAndWrite,
        fn_constructor_kwargs={"model": model, "settings": settings, "batch_size": resources.batch_size,
                               "run_dir": Location.of(run_dir), "decodes": not resources.decode_stage,
                               "earlier": earlier, "made_by": made_by},
        batch_size=resources.part_size,
        batch_format="numpy",
        num_gpus=resources.gpus_per_actor,
        num_cpus=resources.cpus_per_actor,
        compute=actor_pool(resources, blocks),
    )  # Ray Data restarts a dead actor and retries its batch (max_restarts, max_task_retries -1 for actor pools)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
