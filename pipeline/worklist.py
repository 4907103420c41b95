"""The run's work list: every listed image that no run of the series has settled, with its labels.

A Ray task (`pipeline.job.planned`) writes it into the run directory before the actors start. Up to
BUCKET_ROWS inputs are planned in memory. A larger collection is first spilled, a record batch at a
time, into hash buckets of about BUCKET_ROWS images (by path relative to the source, or by file name
when labels name bare files): the listing, the paths this run and earlier runs settled, and the labels.
Each bucket is then anti-joined and labelled on its own (a path, its settled copy and its labels row
share the key, so they share a bucket): the planning worker's memory follows the bucket, not the
collection.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from functools import partial
from itertools import chain
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..schemas.config import JobConfig
from ..schemas.tables import IMAGES, RESULTS
from . import contents
from .sources import (
    file_names,
    image_listing,
    is_glob,
    labels_batches,
    labels_column,
    labels_table,
    last_row_first,
    manifest_batches,
    manifest_rows,
    relative_paths,
    unmatched_names,
)
from .store import Location
from .writers import parts_dataset, retire_read_errors, settled_batches, write_part

log = logging.getLogger(__name__)
WORK_LIST = "work-list.parquet"  # the run's plan: path and labels of each image to do, removed when it finishes
WORK_ROW_GROUP = 4096  # rows per row group of the work list: a block reads only the groups that hold it
BUCKET_ROWS = 1_000_000  # inputs planned at once: about 0.4 KB each on the planning worker
SPILL_ROWS = 1 << 17  # rows read at a time while spilling
SCHEMA = pa.schema([("path", pa.string()), ("labels", pa.string())])


class Planned(NamedTuple):
    inputs: int  # images listed
    todo: int  # of them, those this run annotates
    labels_unmatched: int  # names in the labels file that match no listed image (their images fall back to predictions)
    left_out: dict[str, int]  # the source folder's files not named as images, by suffix (`sources.Listing`)


def plan_work(config: JobConfig, class_names: list[str], run_dir: Path | Location,
              earlier: list[Location]) -> Planned:
    """Write run_dir/WORK_LIST: each listed image not settled by this run or an earlier one (read errors are retried:
    I/O may mend; an earlier run's decode errors too: the file may have been mid-copy), with its labels ("i j", or
    "-" for none), and with earlier runs, the index of their contents (pipeline.contents). Files whose names are not
    UTF-8 are settled here, as error rows. Nothing below config.out is listed (unless the source lies there too): a
    job writing into its own source never annotates its report's overlays."""
    run_dir = Location.of(run_dir)
    run_dir.mkdir()
    scratch = Path(run_dir.path) if run_dir.local else None  # spills beside the run, else in local temp
    for stale in scratch.glob(".plan-*") if scratch else ():  # a planning task killed mid-way (the lease is ours)
        shutil.rmtree(stale, ignore_errors=True)
    retried = retire_read_errors(run_dir)
    if retried:
        log.info("retrying %d images whose read failed", retried)
    skipped = _run_folder(config.out, config.source)
    listing, expected, unnamed, left_out = _listing(config.source, skipped)
    listing = (_outside(paths, skipped) for paths in listing)
    buckets = max(1, math.ceil(expected / BUCKET_ROWS))
    labels = labels_batches(config.labels, class_names, config.source, SPILL_ROWS) if config.labels else None
    # an earlier run's image that did not decode is read again: a photo still being copied when it ran
    settled = chain(settled_batches(run_dir), *(settled_batches(d, retried=("read", "decode")) for d in earlier))
    inputs = todo = unmatched = 0
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".plan-") as spill:
        out = Path(spill) / WORK_LIST
        with pq.ParquetWriter(out, SCHEMA, compression="zstd") as writer:
            if buckets == 1:
                inputs, todo, unmatched = _plan_bucket(writer, config.source, _concat(listing, pa.string()),
                                                       _concat(settled, pa.string()),
                                                       None if labels is None else labels_table(labels))
            else:
                log.info("planning %d inputs in %d buckets", expected, buckets)
                _spill_inputs(Path(spill), config, class_names, listing, settled, labels, buckets)
                for b in range(buckets):
                    listed, done, found = (_read_bucket(Path(spill), name, b) for name in ("listing", "settled",
                                                                                           "labels"))
                    counts = _plan_bucket(writer, config.source, _paths(listed), _paths(done), found)
                    inputs, todo, unmatched = inputs + counts[0], todo + counts[1], unmatched + counts[2]
        (run_dir / WORK_LIST).put_file(out)
        if earlier:
            _index_contents(run_dir, earlier, Path(spill))
    if len(unnamed):
        _settle_unnamed(run_dir, unnamed)
    return Planned(inputs + len(unnamed), todo, unmatched, left_out)


def _listing(source: str, skipped: str | None) -> tuple[Iterable[pa.Array], int, pa.Array, dict[str, int]]:
    """(the listing's paths in batches, how many there are or about, names that are not UTF-8, other files by
    suffix: `sources.Listing`). A manifest is read a batch at a time; a folder or glob is listed whole (its walk
    holds every name), but for the folder `skipped`."""
    if PurePosixPath(source).suffix.lower() in (".csv", ".parquet"):
        return manifest_batches(source, SPILL_ROWS), manifest_rows(source), pa.array([], pa.string()), {}
    paths, unnamed, left_out = image_listing(source, skipped)
    return [paths], len(paths), unnamed, left_out


def _run_folder(out: str, source: str) -> str | None:
    """The folder or prefix out, which is not listed (its report's overlays are no images to do, its parts no
    files left out), unless the source itself lies there: then every image in it is the user's."""
    below = _folder(out)
    return None if _folder(re.split(r"[*?[]", source)[0] if is_glob(source) else source).startswith(below) else below


def _outside(paths: pa.Array, skipped: str | None) -> pa.Array:
    """paths less those below the folder or prefix `skipped`."""
    return paths if skipped is None else paths.filter(pc.invert(pc.starts_with(paths, skipped)))


def _folder(path: str) -> str:
    """A local path made absolute (as listings give them), or a URI, ending in one '/'."""
    return (path if "://" in path else os.path.abspath(path)).rstrip("/") + "/"


def _plan_bucket(writer: pq.ParquetWriter, source: str, listed: pa.ChunkedArray, settled: pa.ChunkedArray,
                 labels: pa.Table | None) -> tuple[int, int, int]:
    """One bucket's images to do, sorted by path, appended to the work list: an Arrow anti-join against
    the settled paths, then the labels joined as a column. Returns (inputs, images to do, label names that
    match no listed image)."""
    unique = pc.unique(listed)
    unique = unique.take(pc.sort_indices(unique))
    todo = unique.filter(pc.invert(pc.is_in(unique, value_set=settled.combine_chunks())))
    unmatched = 0
    if labels is not None:
        found = labels_column(todo, source, last_row_first(labels))
        column = pc.fill_null(pc.binary_join(pc.cast(found, pa.list_(pa.string())), " "), "-")
        unmatched = unmatched_names(unique, source, labels)
    else:
        column = pa.array(["-"] * len(todo), pa.string())
    writer.write_table(pa.table({"path": todo, "labels": column}, schema=SCHEMA), row_group_size=WORK_ROW_GROUP)
    return len(unique), len(todo), unmatched


def _spill_inputs(spill: Path, config: JobConfig, class_names: list[str], listing: Iterable[pa.Array],
                  settled: Iterable[pa.Array], labels: Iterable[pa.Table] | None, buckets: int) -> None:
    """The listing, the settled paths and the labels spilled into buckets by the key that every match of
    the plan shares: a path's bare file name when the labels name bare files (such a label matches that
    name in any folder), else its path relative to the source (a settled path is the same path, a label
    the same relative path), so that a collection of `image.jpg` in every folder still spreads."""
    bare = config.labels is not None and _names_bare_files(
        labels_batches(config.labels, class_names, config.source, SPILL_ROWS))
    path_key = file_names if bare else partial(relative_paths, source=config.source)
    for name, tables, column, key in (("listing", _tables(listing), "path", path_key),
                                      ("settled", _tables(settled), "path", path_key),
                                      ("labels", labels or (), "file_name", file_names if bare else None)):
        _spill(spill, name, tables, partial(_by_key, column=column, key=key, buckets=buckets), buckets)


def bucket_of(keys: pa.Array, buckets: int) -> np.ndarray:
    """Each key's bucket: a CRC of it (a Python loop: about 4 s per million keys, planning only)."""
    return np.fromiter((zlib.crc32(k.encode()) for k in keys.to_pylist()), np.int64, len(keys)) % buckets


def _names_bare_files(labels: Iterable[pa.Table]) -> bool:
    """Whether a labels file names some image by its bare file name (no folder)."""
    return any(pc.any(pc.invert(pc.match_substring(t.column("file_name"), "/"))).as_py() for t in labels)


def _index_contents(run_dir: Location, earlier: list[Location], spill: Path) -> None:
    """The earlier runs' annotated images sorted by content hash, as pipeline.contents reads them: spilled
    into ranges of the hash of about BUCKET_ROWS images each, then each range sorted and appended, so
    memory follows a range, not the series."""
    runs = [d for d in (parts_dataset(e / "annotations", IMAGES) for e in earlier) if d is not None]
    buckets = max(1, math.ceil(sum(d.count_rows() for d in runs) / BUCKET_ROWS))
    tables = (pa.Table.from_batches([b]) for d in runs
              for b in d.to_batches(columns=["image_id", "path"], batch_size=SPILL_ROWS))
    _spill(spill, "contents", tables, partial(_by_hash, buckets=buckets), buckets)
    with (open(spill / contents.HASHES, "wb") as hashes,
          pq.ParquetWriter(spill / contents.IMAGES, contents.SCHEMA) as images):
        for b in range(buckets):
            table = _read_bucket(spill, "contents", b)
            if table is None:
                continue
            table = table.append_column("hash", pa.array(contents.hash_prefixes(table.column("image_id"))))
            table = table.sort_by([("hash", "ascending"), ("image_id", "ascending")])
            hashes.write(table.column("hash").to_numpy().astype("<u8").tobytes())
            images.write_table(table.select(contents.SCHEMA.names), row_group_size=contents.ROW_GROUP)
    for name in (contents.HASHES, contents.IMAGES):
        (run_dir / name).put_file(spill / name)


def _tables(batches: Iterable[pa.Array]) -> Iterable[pa.Table]:
    return (pa.table({"path": batch}) for batch in batches)


def _by_key(table: pa.Table, column: str, key: Callable[[pa.Array], pa.Array] | None, buckets: int) -> np.ndarray:
    values = table.column(column).combine_chunks()
    return bucket_of(values if key is None else key(values), buckets)


def _by_hash(table: pa.Table, buckets: int) -> np.ndarray:
    """Ranges of the content hash: bucket b holds hashes below those of bucket b + 1."""
    return ((contents.hash_prefixes(table.column("image_id")) >> np.uint64(32)) * np.uint64(buckets) >> np.uint64(32))


def _spill(folder: Path, name: str, tables: Iterable[pa.Table], bucket_ids: Callable[[pa.Table], np.ndarray],
           buckets: int) -> None:
    """Tables into one Parquet file per bucket, as bucket_ids assigns their rows."""
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for table in tables:
            ids = bucket_ids(table).astype(np.int64)
            order = np.argsort(ids, kind="stable")
            table, bounds = table.take(order), np.searchsorted(ids[order], np.arange(buckets + 1))
            for b in np.nonzero(np.diff(bounds))[0]:
                piece = table.slice(bounds[b], bounds[b + 1] - bounds[b])
                if b not in writers:
                    writers[b] = pq.ParquetWriter(folder / f"{name}-{b}.parquet", piece.schema)
                writers[b].write_table(piece)
    finally:
        for writer in writers.values():
            writer.close()


def _read_bucket(folder: Path, name: str, bucket: int) -> pa.Table | None:
    path = folder / f"{name}-{bucket}.parquet"
    return pq.read_table(path) if path.exists() else None  # a bucket without labels: every path gets "-"


def _paths(table: pa.Table | None) -> pa.ChunkedArray:
    return pa.chunked_array([], pa.string()) if table is None else table.column("path")


def _concat(batches: Iterable[pa.Array], type_: pa.DataType) -> pa.ChunkedArray:
    return pa.chunked_array([c for b in batches for c in (b.chunks if isinstance(b, pa.ChunkedArray) else [b])],
                            type_)


def _settle_unnamed(run_dir: Location, unnamed: pa.Array) -> None:
    """Error rows (stage "list") for files whose names Arrow cannot hold: counted, never read."""
    rows = {field.name: pa.nulls(len(unnamed), field.type) for field in RESULTS}
    rows.update(path=unnamed, error_stage=pa.array(["list"] * len(unnamed)), error=pa.array(
        ["file name is not valid UTF-8 (escaped here): rename the file to annotate it"] * len(unnamed)))
    write_part(run_dir, pa.table(rows, schema=RESULTS))
