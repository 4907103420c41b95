"""Parquet parts written atomically (pipeline.store) under names fixed by their content.

A run directory (a local folder or an object-store prefix) holds `annotations/part-*.parquet` and
`errors/part-*.parquet`, written by the annotate actors themselves, one part per `--part-size` images.
A part either exists whole or not at all, so a rerun reads the finished parts, skips their images, and
nothing is lost or written twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ..schemas.config import UserError
from ..schemas.tables import ERRORS, IMAGES, RESULTS
from .store import Location

log = logging.getLogger(__name__)
PARTS = "part-*.parquet"  # finished parts; a local write's temporary file starts with "."
FOOTERS_AT_ONCE = 32  # footers read at once (threads: pyarrow releases the GIL while it waits)
FOOTER_CHUNK = 4096  # parts handed to the readers at a time: memory stays flat however many parts


def atomic_write_bytes(path: Path | Location, data: bytes, durable: bool = True) -> None:
    Location.of(path).write_bytes(data, durable)


def atomic_write_json(path: Path | Location, value) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_table(path: Path | Location, table: pa.Table, row_group_size: int | None = None) -> None:
    """table as one Parquet file (zstd), its schema's metadata in the footer."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def footers(folder: Location) -> Iterator[tuple[Location, pq.FileMetaData | None]]:
    """Each part in folder with its Parquet footer (None when it does not read), FOOTERS_AT_ONCE read at a
    time: on an object store each is a round trip, and a run of 100M images has some 400k parts."""
    def read(part: Location) -> tuple[Location, pq.FileMetaData | None]:
        try:
            return part, pq.read_metadata(part.path, filesystem=part.fs)
        except (OSError, ValueError):  # ArrowInvalid (no footer) is a ValueError
            return part, None

    parts = folder.files(PARTS)
    with ThreadPoolExecutor(FOOTERS_AT_ONCE) as pool:
        for start in range(0, len(parts), FOOTER_CHUNK):
            yield from pool.map(read, parts[start : start + FOOTER_CHUNK])


def quarantine_broken_parts(folder: Location) -> list[Location]:
    """Move parts whose Parquet footer does not read (a copy cut short by a non-atomic store) to
    RUN_DIR/quarantine/, so they are neither read nor trusted; their images are annotated again."""
    broken = []
    for part, footer in footers(folder):
        if footer is None:
            target = folder.parent / "quarantine" / f"{folder.name}-{part.name}"
            log.warning("unreadable part %s moved to %s", part, target)
            part.move(target)
            broken.append(target)
    return broken


def read_parts(folder: Path | Location, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every finished part under folder (temp files start with '.', which pyarrow ignores)."""
    parts = parts_dataset(folder, schema)
    if parts is None:
        return schema.empty_table().select(columns) if columns else schema.empty_table()
    return parts.to_table(columns=columns)


def parts_dataset(folder: Path | Location, schema: pa.Schema) -> pads.Dataset | None:
    """The finished parts under folder as one pyarrow dataset (None when there are none)."""
    folder = Location.of(folder)
    parts = [p.path for p in folder.files(PARTS)]
    return pads.dataset(parts, schema=schema, format="parquet", filesystem=folder.fs) if parts else None


COUNT_KEY = b"camlabel.annotations"  # a part's annotation count, in its footer: counting reads no rows
PROVENANCE_KEY = b"camlabel.provenance"  # what made a part's rows (`provenance`, JSON), in its footer
PROVENANCE = ("series", "settings", "rule", "versions", "devices", "precisions")  # of a manifest's fields


def provenance(manifest: dict) -> dict:
    """What made a run's labels, from its manifest: the model and its weights' hash (not its class names), the
    series, settings and box rule as run, the package versions and, once parts have landed, the actors' devices
    and precisions."""
    model = {k: v for k, v in manifest.get("model", {}).items() if k != "class_names"}
    return {"model": model, **{k: manifest[k] for k in PROVENANCE if k in manifest}}


def write_part(run_dir: Path | Location, results: pa.Table, made_by: dict | None = None) -> dict:
    """One batch's results (schemas.RESULTS) as a part named by its images' paths: a retried batch writes
    the same name again, so its rows land once. made_by (`provenance`) goes in the footer of each file: a part
    read alone, or one written before a resume by another camlabel, still says what made its rows. Returns
    the part's counts, all the driver receives."""
    run_dir, table = Location.of(run_dir), results.cast(RESULTS).sort_by("path")
    name = "part-" + hashlib.sha256("\n".join(table.column("path").to_pylist()).encode()).hexdigest()[:20]
    failed = table.filter(pc.is_valid(table.column("error")))
    good = table.filter(pc.is_null(table.column("error")))
    annotations = int(pc.sum(pc.list_value_length(good.column("annotations"))).as_py() or 0)
    footer = {} if made_by is None else {PROVENANCE_KEY: json.dumps(made_by, sort_keys=True).encode()}
    if failed.num_rows:
        errors = pa.table({"path": failed.column("path"), "stage": failed.column("error_stage"),
                           "reason": failed.column("error")}, schema=ERRORS)
        atomic_write_table(run_dir / "errors" / f"{name}.parquet", errors.replace_schema_metadata(footer))
    if good.num_rows:
        rows = good.select(IMAGES.names).replace_schema_metadata({COUNT_KEY: str(annotations).encode(), **footer})
        atomic_write_table(run_dir / "annotations" / f"{name}.parquet", rows)
    return {"part": name, "annotated": good.num_rows, "errors": failed.num_rows, "annotations": annotations}


def check_parts(run_dir: Path | Location) -> None:
    """A RunError naming the first of the run's parts that does not read (damaged after it was written: parts are
    written whole), before a command that reads the run fails inside pyarrow with a traceback."""
    run_dir = Location.of(run_dir)
    for folder in ("annotations", "errors"):
        damaged = next((part for part, meta in footers(run_dir / folder) if meta is None), None)
        if damaged is not None:
            raise RunError(f"{damaged} does not read; the next annotate into its run moves it to quarantine and "
                           "redoes its images")


def run_counts(run_dir: Path | Location) -> dict[str, int]:
    """Annotated images, error rows and annotations of a run, from its parts' footers alone."""
    def read(folder: Location) -> Iterator[pq.FileMetaData]:
        for part, meta in footers(folder):
            if meta is None:
                raise OSError(f"{part} does not read; the next run moves it to quarantine and redoes its images")
            yield meta

    run_dir, counts = Location.of(run_dir), {"annotated": 0, "errors": 0, "annotations": 0}
    for meta in read(run_dir / "annotations"):
        counts["annotated"] += meta.num_rows
        counts["annotations"] += int((meta.metadata or {}).get(COUNT_KEY, b"0"))
    counts["errors"] = sum(meta.num_rows for meta in read(run_dir / "errors"))
    return counts


def retire_read_errors(run_dir: Path | Location) -> int:
    """Drop the run's read-stage error rows (I/O, network: worth another try) so that a resumed run
    reads those images again; decode and annotate errors stay final. Returns how many were dropped."""
    dropped = 0
    for part in (Location.of(run_dir) / "errors").files(PARTS):
        errors = pq.read_table(part.path, filesystem=part.fs, schema=ERRORS)
        kept = errors.filter(pc.not_equal(errors.column("stage"), "read"))
        if kept.num_rows < errors.num_rows:
            dropped += errors.num_rows - kept.num_rows
            if kept.num_rows:
                atomic_write_table(part, kept)
            else:
                part.unlink()
    return dropped


def settled_batches(run_dir: Path | Location, retried: tuple[str, ...] = ("read",)) -> Iterator[pa.Array]:
    """Paths of every image a run has settled (annotated, or failed at a stage not in `retried`), as Arrow
    strings a record batch at a time (parts read by pyarrow's dataset scanner, never all at once, never a Python
    set). Read errors are retried by default: I/O may mend."""
    run_dir = Location.of(run_dir)
    quarantine_broken_parts(run_dir / "annotations")
    quarantine_broken_parts(run_dir / "errors")
    for folder, schema in (("annotations", IMAGES), ("errors", ERRORS)):
        parts = parts_dataset(run_dir / folder, schema)
        for batch in parts.to_batches(columns=["path", "stage"] if schema is ERRORS else ["path"]) if parts else ():
            if schema is ERRORS:
                batch = batch.filter(pc.invert(pc.is_in(batch.column("stage"), value_set=pa.array(retried))))
            yield batch.column("path")


class RunError(UserError):
    pass


def read_manifest(run_dir: Path | Location) -> dict:
    """A run's manifest; a RunError naming the folder when it has none (a mistyped path, not a run) or the file
    when it is not one."""
    path = Location.of(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a camlabel run: it has no manifest.json")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # binary, not JSON, or nested past the parser's limit
        raise RunError(f"{path} cannot be read as a camlabel manifest: {type(exc).__name__}: {exc}") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("source"), str)
            and isinstance(manifest.get("model"), dict) and isinstance(manifest["model"].get("class_names"), list)):
        raise RunError(f"{path} is not a camlabel manifest (no source, model and class names): was it overwritten?")
    return manifest


def io_reason(exc: OSError) -> str:
    """`[Errno 28] No space left on device`, also for an actor's OSError raised through Ray (its `cause`;
    Ray Data appends its own advice to the filename)."""
    cause = getattr(exc, "cause", exc)
    return f"[Errno {cause.errno}] {cause.strerror}" if cause.errno else str(cause)


def warn_if_unfinished(run_dir: Path | Location, manifest: dict) -> None:
    """A run stopped, or still running (or its driver killed), holds its finished parts only: read as it is,
    with a warning, not passed off as the whole collection."""
    status = manifest.get("status")
    if status not in (None, "finished"):
        log.warning("%s has not finished (status %s): only the images of its finished parts are read; run its "
                    "annotate command again to finish it", run_dir, status)


def run_folders(root: Path | Location) -> list[Location]:
    """The runs under an incremental root (root/runs/<run-id>/ with a manifest), oldest first."""
    return [run for run in (Location.of(root) / "runs").folders() if (run / "manifest.json").is_file()]
