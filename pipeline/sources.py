"""What to annotate: image paths from a folder, a glob or a manifest, and image-level labels from a CSV.

Local paths and any URI that pyarrow's filesystems open (s3://, gs://, file://).
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import os
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class SourceError(ValueError):
    """A source, manifest or labels file that cannot be used; the message names the file and line."""


def _is_uri(path: str) -> bool:
    return "://" in path


def list_images(source: str) -> list[str]:
    """Sorted, de-duplicated image paths under a directory (recursive), a glob, or a manifest's `path` column."""
    return image_listing(source).to_pylist()


def image_listing(source: str) -> pa.Array:
    """list_images as an Arrow string array: a manifest's paths never become Python objects."""
    suffix = PurePosixPath(source).suffix.lower()
    if suffix in (".csv", ".parquet"):
        return _from_manifest(source)
    if _is_uri(source):
        fs, root = pafs.FileSystem.from_uri(source)
        prefix = source[: len(source) - len(root)] if source.endswith(root) else ""
        pattern = None
        if any(c in root for c in "*?["):
            pattern, root = root, root.split("*")[0].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=False))
        paths = [i.path for i in infos if i.type == pafs.FileType.File]
        paths = [p for p in paths if fnmatch.fnmatch(p, pattern)] if pattern else paths
        return _sorted({prefix + p for p in paths if PurePosixPath(p).suffix.lower() in IMAGE_SUFFIXES})
    if any(c in source for c in "*?["):
        return _sorted({os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)})
    if not os.path.isdir(source):
        raise SourceError(f"source {source!r} is not a directory, a glob, a .csv/.parquet manifest or a URI")
    found = set()
    for folder, _dirs, files in os.walk(source, followlinks=False):  # symlinked folders are not followed
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                found.add(os.path.abspath(os.path.join(folder, name)))
    return _sorted(found)


def _sorted(paths) -> pa.Array:
    return pa.array(sorted(paths), pa.string())


def _from_manifest(manifest: str) -> pa.Array:
    """The manifest's `path` column, checked, joined to the manifest's folder, sorted and de-duplicated,
    in Arrow compute throughout (a 100M-row manifest stays columnar)."""
    try:
        columns = pq.read_schema(manifest).names if manifest.endswith(".parquet") else None
        table = pq.read_table(manifest, columns=["path"] if "path" in columns else None) if columns else (
            pacsv.read_csv(manifest))
    except Exception as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc
    if "path" not in table.column_names:
        raise SourceError(f"manifest {manifest} has no 'path' column (columns: {', '.join(table.column_names)})")
    paths = pc.cast(table.column("path").combine_chunks(), pa.string())

    def first(bad: pa.Array) -> int | None:
        index = pc.index(pc.fill_null(bad, True), True).as_py()
        return None if index < 0 else index

    empty = first(pc.equal(pc.utf8_length(paths), 0))
    if empty is not None:
        raise SourceError(f"{manifest}:{empty + 2}: empty path")
    climbing = first(pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)"))
    if climbing is not None:
        raise SourceError(f"{manifest}:{climbing + 2}: path {paths[climbing].as_py()!r} climbs out with '..'")
    base = os.path.dirname(os.path.abspath(manifest)) if not _is_uri(manifest) else manifest.rsplit("/", 1)[0]
    whole = pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://"))
    joined = pc.if_else(whole, paths, pc.binary_join_element_wise(base, paths, "/"))
    unique = pc.unique(joined)
    return unique.take(pc.sort_indices(unique))


def read_labels(path: str, class_names: list[str]) -> dict[str, list[int]]:
    """file_name -> class indices, from a CSV with columns file_name and labels (space-separated
    indices or class names; a name with spaces is written with underscores)."""
    lookup = {n.lower(): i for i, n in enumerate(class_names)}
    lookup.update({n.lower().replace(" ", "_"): i for i, n in enumerate(class_names)})
    labels: dict[str, list[int]] = {}
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file_name", "labels"} - set(reader.fieldnames or [])
            if missing:
                raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
            for line, row in enumerate(reader, start=2):
                name = (row.get("file_name") or "").strip()
                if not name or ".." in PurePosixPath(name).parts or os.path.isabs(name):
                    raise SourceError(f"{path}:{line}: file_name {name!r} must be a relative path without '..'")
                classes = []
                for token in (row.get("labels") or "").split():
                    index = int(token) if token.isdigit() else lookup.get(token.lower())
                    if index is None or not 0 <= index < len(class_names):
                        raise SourceError(f"{path}:{line}: unknown class {token!r} (use an index below "
                                          f"{len(class_names)} or a class name)")
                    classes.append(index)
                labels[name] = sorted(set(classes))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SourceError(f"cannot read labels {path}: {exc}") from exc
    return labels


def relative_path(path: str, source: str) -> str:
    """The image's path below its source's folder (a folder, a glob's folder, a manifest's folder); for a
    path outside it or a URI, the whole path without scheme or leading '/'. Never climbs out with '..',
    so outputs named after it stay inside their folder and two images never share a name."""
    if _is_uri(path):
        return path.split("://", 1)[1].lstrip("/")
    if PurePosixPath(source).suffix.lower() in (".csv", ".parquet"):
        root = os.path.dirname(os.path.abspath(source))
    else:
        root = source.split("*")[0] if any(c in source for c in "*?[") else source
        root = root if os.path.isdir(root) else os.path.dirname(root)
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return relative if relative != ".." and not relative.startswith("../") else os.path.abspath(path).lstrip("/")


def labels_for(path: str, source: str, labels: dict[str, list[int]]) -> list[int] | None:
    """The image's labels, matched by its path relative to the source, else by its bare file name."""
    for key in (relative_path(path, source), PurePosixPath(path).name):
        if key in labels:
            return labels[key]
    return None
