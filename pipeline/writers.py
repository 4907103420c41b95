"""Parquet parts written atomically (temp file, fsync, rename) under names fixed by their content.

A run directory holds `annotations/part-*.parquet` and `errors/part-*.parquet`. A part either exists
whole or not at all, so a rerun reads the finished parts, skips their images, and nothing is lost or
written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..schemas.tables import ERRORS, IMAGES, RESULTS

log = logging.getLogger(__name__)


@contextmanager
def atomic_file(path: Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A file written under a temporary name beside `path` and renamed onto it only when the block
    succeeds (after an fsync, if durable): readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    with atomic_file(path, "wb", durable) as f:
        f.write(data)


def atomic_write_json(path: Path, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def quarantine_broken_parts(folder: Path) -> list[Path]:
    """Move parts whose Parquet footer does not read (a copy cut short by a non-atomic store) to
    RUN_DIR/quarantine/, so they are neither read nor trusted; their images are annotated again."""
    broken = []
    for part in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
        try:
            pq.read_metadata(part)
        except Exception:
            target = folder.parent / "quarantine" / f"{folder.name}-{part.name}"
            log.warning("unreadable part %s moved to %s", part, target)
            target.parent.mkdir(exist_ok=True)
            part.rename(target)
            broken.append(target)
    return broken


def read_parts(folder: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every finished part under folder (temp files start with '.', which pyarrow ignores)."""
    if not folder.is_dir() or not any(folder.glob("part-*.parquet")):
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return pads.dataset([str(p) for p in sorted(folder.glob("part-*.parquet"))], schema=schema,
                        format="parquet").to_table(columns=columns)


class RunWriter:
    """Buffers result rows and writes them as parts of about `rows_per_part` images."""

    def __init__(self, run_dir: Path, rows_per_part: int = 1000) -> None:
        self.run_dir = Path(run_dir)
        self.rows_per_part = rows_per_part
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.written_paths: set[str] = set()
        self.known_ids: set[str] = set()  # content already annotated by an earlier run of the series

    def done_paths(self) -> set[str]:
        """Paths of every image already in a finished part (annotated or failed)."""
        quarantine_broken_parts(self.run_dir / "annotations")
        quarantine_broken_parts(self.run_dir / "errors")
        done = set(read_parts(self.run_dir / "annotations", IMAGES, ["path"]).column("path").to_pylist())
        return done | set(read_parts(self.run_dir / "errors", ERRORS, ["path"]).column("path").to_pylist())

    def add(self, results: pa.Table) -> None:
        """results: schemas.RESULTS rows. Rows for a path already written (a retried task) and images
        whose content an earlier run annotated are dropped."""
        paths = results.column("path").to_pylist()
        ids = results.column("image_id").to_pylist()
        fresh = [i for i, (p, h) in enumerate(zip(paths, ids, strict=True))
                 if p not in self.written_paths and h not in self.known_ids]
        if len(fresh) < len(paths):
            results = results.take(pa.array(fresh, type=pa.int64()))
        self.written_paths.update(results.column("path").to_pylist())
        self.pending.append(results.cast(RESULTS))
        self.pending_rows += results.num_rows
        if self.pending_rows >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.pending_rows:
            return
        table = pa.concat_tables(self.pending).sort_by("path")
        self.pending, self.pending_rows = [], 0
        name = "part-" + hashlib.sha256("\n".join(table.column("path").to_pylist()).encode()).hexdigest()[:20]
        failed = table.filter(pc.is_valid(table.column("error")))
        good = table.filter(pc.is_null(table.column("error")))
        if failed.num_rows:
            errors = pa.table({"path": failed.column("path"), "stage": failed.column("error_stage"),
                               "reason": failed.column("error")}, schema=ERRORS)
            atomic_write_table(self.run_dir / "errors" / f"{name}.parquet", errors)
        if good.num_rows:
            atomic_write_table(self.run_dir / "annotations" / f"{name}.parquet", good.select(IMAGES.names))
