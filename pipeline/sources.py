"""What to annotate: image paths from a folder, a glob or a manifest, and image-level labels from a CSV.

Local paths and any URI that pyarrow's filesystems open (s3://, gs://, file://).
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..schemas.config import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


class SourceError(UserError):
    """A source, manifest or labels file that cannot be used; the message names the file and line."""


def _is_uri(path: str) -> bool:
    return "://" in path


def list_images(source: str) -> list[str]:
    """Sorted, de-duplicated image paths under a directory (recursive), a glob, or a manifest's `path` column."""
    return image_listing(source)[0].to_pylist()


def image_listing(source: str) -> tuple[pa.Array, pa.Array]:
    """list_images as an Arrow string array (a manifest's paths never become Python objects), and the
    names found that are not valid UTF-8, backslash-escaped: Arrow cannot hold them, so they cannot be
    read by name; the job records each as an error row instead of failing on one."""
    suffix = PurePosixPath(source).suffix.lower()
    if suffix in (".csv", ".parquet"):
        return _from_manifest(source), pa.array([], pa.string())
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


def _sorted(paths) -> tuple[pa.Array, pa.Array]:
    named = [p for p in paths if _is_utf8(p)]
    unnamed = [os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths if not _is_utf8(p)]
    return pa.array(sorted(named), pa.string()), pa.array(sorted(unnamed), pa.string())


def _is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    empty = _first(pc.equal(pc.utf8_length(paths), 0))
    if empty is not None:
        raise SourceError(f"{manifest}:{empty + 2}: empty path")
    climbing = _first(pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)"))
    if climbing is not None:
        raise SourceError(f"{manifest}:{climbing + 2}: path {paths[climbing].as_py()!r} climbs out with '..'")
    base = os.path.dirname(os.path.abspath(manifest)) if not _is_uri(manifest) else manifest.rsplit("/", 1)[0]
    whole = pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://"))
    joined = pc.if_else(whole, paths, pc.binary_join_element_wise(base, paths, "/"))
    unique = pc.unique(joined)
    return unique.take(pc.sort_indices(unique))


def read_labels(path: str, class_names: list[str]) -> pa.Table:
    """A labels CSV (columns file_name and labels: space-separated class indices or names, a name with
    spaces written with underscores) as a table of file_name and labels (sorted class indices), read and
    checked in Arrow compute: a million rows never become Python objects. A file_name listed twice keeps
    its last row."""
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"file_name": pa.string(), "labels": pa.string()}, strings_can_be_null=False))
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read labels {path}: {exc}") from exc
    missing = {"file_name", "labels"} - set(table.column_names)
    if missing:
        raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    names = pc.utf8_trim_whitespace(table.column("file_name").combine_chunks())
    bad = _first(pc.or_(pc.or_(pc.equal(pc.utf8_length(names), 0), pc.starts_with(names, "/")),
                        pc.match_substring_regex(names, r"(^|/)\.\.(/|$)")))
    if bad is not None:
        raise SourceError(f"{path}:{bad + 2}: file_name {names[bad].as_py()!r} must be a relative path without '..'")
    tokens = pc.split_pattern_regex(pc.utf8_trim_whitespace(table.column("labels").combine_chunks()), r"\s+")
    flat, row = pc.list_flatten(tokens), pc.list_parent_indices(tokens)
    some = pc.greater(pc.utf8_length(flat), 0)
    flat, row = flat.filter(some), row.filter(some)
    vocabulary = [str(i) for i in range(len(class_names))] + [n.lower() for n in class_names] + [
        n.lower().replace(" ", "_") for n in class_names]
    found = pc.index_in(pc.replace_substring_regex(pc.utf8_lower(flat), "^0+([0-9])", r"\1"),
                        value_set=pa.array(vocabulary))
    unknown = _first(pc.is_null(found))
    if unknown is not None:
        raise SourceError(f"{path}:{row[unknown].as_py() + 2}: unknown class {flat[unknown].as_py()!r} (use an "
                          f"index below {len(class_names)} or a class name)")
    rows = np.asarray(row, np.int64)
    classes = np.asarray(pc.cast(found, pa.int64())) % len(class_names)  # position in the vocabulary -> index
    order = np.lexsort((classes, rows))
    rows, classes = rows[order], classes[order]
    new = np.ones(len(rows), bool)
    new[1:] = (rows[1:] != rows[:-1]) | (classes[1:] != classes[:-1])  # each class once per row
    rows, classes = rows[new], classes[new]
    offsets = np.searchsorted(rows, np.arange(len(names) + 1)).astype(np.int32)
    labels = pa.ListArray.from_arrays(pa.array(offsets), pa.array(classes, pa.int32()))
    last_first = pa.array(np.arange(len(names))[::-1])  # the join takes the first match: a name's last row
    return pa.table({"file_name": names.take(last_first), "labels": labels.take(last_first)})


def labels_column(paths: pa.Array, source: str, labels: pa.Table) -> pa.Array:
    """Each path's labels (a list of class indices; null where labels has no row for it), matched by its
    path relative to the source, else by its bare file name: a join in Arrow compute."""
    names = labels.column("file_name").combine_chunks()
    at = pc.coalesce(pc.index_in(relative_paths(paths, source), value_set=names),
                     pc.index_in(pc.replace_substring_regex(paths, r"^.*/", ""), value_set=names))
    return labels.column("labels").combine_chunks().take(at)


def _first(bad: pa.Array) -> int | None:
    index = pc.index(pc.fill_null(bad, True), True).as_py()
    return None if index < 0 else index


def relative_paths(paths: pa.Array, source: str) -> pa.Array:
    """Each of a listing's paths (absolute, or URIs) below its source's folder (a folder, a glob's folder,
    a manifest's folder); for a path outside it or a URI, the whole path without scheme or leading '/'.
    Never climbs out with '..', so outputs named after it stay inside their folder and two images never
    share a name. In Arrow compute: a batch at a time."""
    if PurePosixPath(source).suffix.lower() in (".csv", ".parquet"):
        root = os.path.dirname(os.path.abspath(source))
    else:
        root = source.split("*")[0] if any(c in source for c in "*?[") else source
        root = root if os.path.isdir(root) else os.path.dirname(root)
    root = os.path.abspath(root).rstrip("/") + "/"
    local = pc.if_else(pc.starts_with(paths, root), pc.utf8_slice_codeunits(paths, len(root)),
                       pc.utf8_ltrim(paths, "/"))
    return pc.if_else(pc.match_substring(paths, "://"),
                      pc.utf8_ltrim(pc.replace_substring_regex(paths, "^[^/]*://", ""), "/"), local)
