"""What to annotate: image paths from an image, a folder, a glob or a manifest, and image-level labels from a CSV.

Local paths and any URI that pyarrow's filesystems open (s3://, gs://, file://).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ..schemas.config import UserError
from ..workers.classes import imagenet_class_names, imagenet_wnids

# What a folder or a bucket is listed for: the names of the formats workers.decode opens. Other files are
# counted by suffix (`Listing.left_out`) and named in a warning: not annotated, and not passed over unseen.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".tif", ".tiff",
                  ".avif", ".jp2", ".j2k", ".pbm", ".pgm", ".ppm", ".pnm"}


class SourceError(UserError):
    """A source, manifest or labels file that cannot be used; the message names the file and line."""


def _is_uri(path: str) -> bool:
    return "://" in path


def is_glob(source: str) -> bool:
    """A local source with `*`, `?` or `[` is a pattern, unless it names a folder (`photos[2024]/` is one)."""
    return any(c in source for c in "*?[") and not os.path.isdir(source)


class Listing(NamedTuple):
    paths: pa.Array  # sorted, de-duplicated image paths (a manifest's never become Python objects)
    unnamed: pa.Array  # names that are not valid UTF-8, backslash-escaped
    left_out: dict[str, int]  # a folder's or bucket's other files, by suffix ("" for none): {".heic": 118}


def list_images(source: str) -> list[str]:
    """Sorted, de-duplicated image paths under a directory (recursive), a glob, or a manifest's `path` column."""
    return image_listing(source).paths.to_pylist()


def image_listing(source: str, skipped: str | None = None) -> Listing:
    """list_images as an Arrow string array, with the names found that are not valid UTF-8 (Arrow cannot hold
    them, so they cannot be read by name; the job records each as an error row instead of failing on one) and
    the files a folder or bucket holds that are not named as images. A file, a glob or a manifest lists what it
    names.
    A folder or bucket is listed but for what lies below `skipped` (an absolute folder or a URI ending in '/':
    a run's own output)."""
    suffix = PurePosixPath(source).suffix.lower()
    if suffix in (".csv", ".parquet"):
        return Listing(_from_manifest(source), pa.array([], pa.string()), {})
    if _is_uri(source):
        if "?" in source:
            raise SourceError(f"source {source}: options in a source URI (after '?') would not reach the workers, "
                              "which read each image by its own URI; set them in the environment (e.g. "
                              "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION)")
        scheme, rest = source.split("://", 1)
        user = rest.partition("/")[0].rpartition("@")[0]  # credentials, which each image's URI needs too
        prefix = f"{scheme}://{user}@" if user else f"{scheme}://"  # the listing's paths are bucket/key
        try:
            fs, root = pafs.FileSystem.from_uri(source)
            pattern = None
            if any(c in root for c in "*?["):
                pattern, root = root, root.split("*")[0].rsplit("/", 1)[0]
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=False))
        except (OSError, pa.ArrowInvalid) as exc:  # unreachable, no such bucket, no credentials, a bad URI
            raise SourceError(f"cannot list {source}: {exc}") from None
        paths = [prefix + i.path for i in infos if i.type == pafs.FileType.File]
        paths = [p for p in paths if not (skipped and p.startswith(skipped))]
        if pattern:
            return _sorted({p for p in paths if fnmatch.fnmatch(p.removeprefix(prefix), pattern)})
        return _sorted(paths)
    if is_glob(source):
        return _sorted({os.path.abspath(p) for p in glob.glob(source, recursive=True) if os.path.isfile(p)},
                       every_file=False)
    if os.path.isfile(source):  # one image, whatever its name: the user named it
        return _sorted({os.path.abspath(source)}, every_file=False)
    if not os.path.isdir(source):
        raise SourceError(f"source {source!r} " + ("is not a regular file or a directory" if os.path.exists(source)
                                                   else "does not exist (nor is it a pattern or a URI)"))
    return _sorted(_walk(source, skipped))


def _walk(source: str, skipped: str | None) -> Iterator[str]:
    """Every file below the folder source, as an absolute path, but those below `skipped`; symlinked folders
    are not followed (no loops)."""
    for folder, dirs, files in os.walk(source, followlinks=False):
        folder = os.path.abspath(folder)
        dirs[:] = [d for d in dirs if not (skipped and os.path.join(folder, d, "").startswith(skipped))]
        yield from (os.path.join(folder, name) for name in files)


def _sorted(paths: Iterable[str], every_file: bool = True) -> Listing:
    """The listing of `paths`: every file of a folder or bucket (`every_file`), where only the names of images
    are kept, or the files a glob matched, all kept."""
    named, unnamed, left_out = set(), set(), Counter()
    for path in paths:
        suffix = PurePosixPath(path).suffix.lower()
        if every_file and suffix not in IMAGE_SUFFIXES:
            left_out[_escaped(suffix)] += 1
        elif _is_utf8(path):
            named.add(path)
        else:
            unnamed.add(_escaped(path))
    return Listing(pa.array(sorted(named), pa.string()), pa.array(sorted(unnamed), pa.string()), dict(left_out))


def _escaped(name: str) -> str:
    """A name whose bytes are not UTF-8 (Python holds them as lone surrogates), backslash-escaped."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    """False for a name whose bytes are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _from_manifest(manifest: str) -> pa.Array:
    """The manifest's paths (`manifest_batches`), sorted and de-duplicated."""
    unique = pc.unique(pa.chunked_array(list(manifest_batches(manifest)), pa.string()))
    return unique.take(pc.sort_indices(unique))


def manifest_batches(manifest: str, rows: int = 1 << 17) -> Iterator[pa.Array]:
    """The manifest's `path` column about `rows` at a time, checked (errors name the line) and joined to
    the manifest's folder, in Arrow compute throughout (a 100M-row manifest is never held whole)."""
    base = os.path.dirname(os.path.abspath(manifest)) if not _is_uri(manifest) else manifest.rsplit("/", 1)[0]
    line = 2  # the first data row's line in a CSV (Parquet rows are counted the same way)
    try:
        with _open(manifest) as file:
            if PurePosixPath(manifest).suffix.lower() == ".parquet":
                reader = pq.ParquetFile(file)
                columns = reader.schema_arrow.names
                batches = reader.iter_batches(batch_size=rows, columns=["path"]) if "path" in columns else iter(())
            else:
                reader = pacsv.open_csv(file, read_options=pacsv.ReadOptions(block_size=64 * rows),
                                        convert_options=pacsv.ConvertOptions(column_types={"path": pa.string()}))
                columns, batches = reader.schema.names, reader
            if "path" not in columns:
                raise SourceError(f"manifest {manifest} has no 'path' column (columns: {', '.join(columns)})")
            for batch in batches:
                paths = pc.cast(batch.column("path"), pa.string())
                yield _checked_paths(paths, manifest, line, base)
                line += len(paths)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc


def manifest_rows(manifest: str) -> int:
    """A Parquet manifest's rows (its footer), or about a CSV manifest's (its size over 64 bytes a line)."""
    try:
        with _open(manifest) as file:
            if PurePosixPath(manifest).suffix.lower() == ".parquet":
                return pq.ParquetFile(file).metadata.num_rows
            return file.size() // 64
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read manifest {manifest}: {exc}") from exc


def _open(path: str):
    """A local file or a URI (pyarrow's filesystems), opened for random access."""
    if _is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.open_input_file(inner)
    return pa.OSFile(path)


def _checked_paths(paths: pa.Array, manifest: str, line: int, base: str) -> pa.Array:
    empty = _first(pc.equal(pc.utf8_length(paths), 0))
    if empty is not None:
        raise SourceError(f"{manifest}:{line + empty}: empty path")
    climbing = _first(pc.match_substring_regex(paths, r"(^|/)\.\.(/|$)"))
    if climbing is not None:
        raise SourceError(f"{manifest}:{line + climbing}: path {paths[climbing].as_py()!r} climbs out with '..'")
    uris = pc.match_substring(paths, "://")
    return plain_paths(pc.if_else(pc.or_(pc.starts_with(paths, "/"), uris), paths,
                                  pc.binary_join_element_wise(base, paths, "/")))


def plain_paths(paths: pa.Array) -> pa.Array:
    """Local paths without their '.' segments and repeated '/' ('..' is refused before), as os.path.normpath
    writes them: a manifest made by `find .` (`./shoot/a.jpg`) names the image a folder's listing names, so
    labels given as `shoot/a.jpg` find it, and `./a.jpg` beside `a.jpg` is one image, annotated once. A URI is
    kept as written: an object store's key is its own name."""
    local = pc.replace_substring_regex(paths, "/{2,}", "/")
    local = pc.replace_substring_regex(local, r"(^|/)(\./)+", r"\1")
    local = pc.replace_substring_regex(local, r"(.)/\.$", r"\1")
    return pc.if_else(pc.match_substring(paths, "://"), paths, local)


def read_labels(path: str, class_names: list[str], source: str) -> pa.Table:
    """A labels CSV (columns file_name and labels: space-separated class indices or names, a name with
    spaces written with underscores) as a table of file_name (as `label_names` reads it for `source`) and labels
    (sorted class indices), read and checked in Arrow compute: a million rows never become Python objects. A
    file_name listed twice keeps its last row."""
    return last_row_first(labels_table(labels_batches(path, class_names, source)))


LABELS = pa.schema([("file_name", pa.string()), ("labels", pa.list_(pa.int32())), ("row", pa.int64())])


def labels_table(batches) -> pa.Table:
    """labels_batches' tables as one (a CSV of a header alone gives none)."""
    return pa.concat_tables([LABELS.empty_table(), *batches])


def last_row_first(labels: pa.Table) -> pa.Table:
    """labels_batches' rows, the last of the file first (a join takes the first match: a name's last
    row), without the row column."""
    return labels.take(pc.sort_indices(labels, [("row", "descending")])).drop_columns(["row"])


def labels_batches(path: str, class_names: list[str], source: str, rows: int = 1 << 17) -> Iterator[pa.Table]:
    """The labels CSV about `rows` at a time as tables of file_name (`label_names`), labels and row (its place
    in the file); every error names its line."""
    vocabulary = _vocabulary(class_names)
    first = 0
    try:
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=64 * rows),
                                convert_options=pacsv.ConvertOptions(
                                    column_types={"file_name": pa.string(), "labels": pa.string()},
                                    strings_can_be_null=False))
        missing = {"file_name", "labels"} - set(reader.schema.names)
        if missing:
            raise SourceError(f"{path}: missing column(s) {', '.join(sorted(missing))}; its header holds "
                              f"{reader.schema.names} (a CSV's columns are separated by commas)")
        for batch in reader:
            yield _parsed_labels(batch, path, source, len(class_names), vocabulary, first)
            first += batch.num_rows
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read labels {path}: {exc}") from exc


def _vocabulary(class_names: list[str]) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """How a label names a class: (tokens, their classes) matched as written (an index, a name, the name with
    underscores for spaces, and for ImageNet's classes their WordNet id, `n02123045`, as ImageNet's folders are
    named), then (tokens, their classes) in lower case, -1 where two classes' names differ only in case
    (ImageNet's Cardigan, the dog, and cardigan, the sweater)."""
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}
    wnids = imagenet_wnids() if class_names == imagenet_class_names() else [None] * len(class_names)
    for i, (name, wnid) in enumerate(zip(class_names, wnids, strict=True)):
        for token in dict.fromkeys(t for t in (name, name.replace(" ", "_"), wnid) if t):
            exact.setdefault(token, i)
            folded[token.lower()] = i if folded.get(token.lower(), i) == i else -1
    exact.update({str(i): i for i in range(len(class_names))})
    return (pa.array(list(exact)), pa.array(list(exact.values())),
            pa.array(list(folded)), pa.array(list(folded.values())))


def _parsed_labels(batch: pa.RecordBatch, path: str, source: str, classes: int, vocabulary: tuple[pa.Array, ...],
                   first: int) -> pa.Table:
    names = pc.utf8_trim_whitespace(batch.column("file_name"))
    local = pc.invert(pc.match_substring(names, "://"))
    bad = _first(pc.or_(pc.equal(pc.utf8_length(names), 0),
                        pc.and_(local, pc.match_substring_regex(names, r"(^|/)\.\.(/|$)"))))
    if bad is not None:
        raise SourceError(f"{path}:{first + bad + 2}: file_name {names[bad].as_py()!r} must name an image "
                          "without '..'")
    names = label_names(names, source)
    tokens = pc.split_pattern_regex(pc.utf8_trim_whitespace(batch.column("labels")), r"\s+")
    flat, row = pc.list_flatten(tokens), pc.list_parent_indices(tokens)
    some = pc.greater(pc.utf8_length(flat), 0)
    flat, row = flat.filter(some), row.filter(some)
    token = pc.replace_substring_regex(flat, "^0+([0-9])", r"\1")
    exact, exact_class, folded, folded_class = vocabulary
    found = pc.coalesce(pc.take(exact_class, pc.index_in(token, value_set=exact)),
                        pc.take(folded_class, pc.index_in(pc.utf8_lower(token), value_set=folded)))
    unknown = _first(pc.is_null(found))
    if unknown is not None:
        raise SourceError(f"{path}:{first + row[unknown].as_py() + 2}: unknown class {flat[unknown].as_py()!r} "
                          f"(use an index below {classes} or a class name; classes are separated by spaces, so a "
                          "name's own spaces are written as underscores: great_white_shark)")
    ambiguous = _first(pc.equal(found, -1))
    if ambiguous is not None:
        raise SourceError(f"{path}:{first + row[ambiguous].as_py() + 2}: {flat[ambiguous].as_py()!r} names two "
                          "classes that differ only in case: write the name's exact case or its index")
    rows = np.asarray(row, np.int64)
    indices = np.asarray(found, np.int64)
    order = np.lexsort((indices, rows))
    rows, indices = rows[order], indices[order]
    new = np.ones(len(rows), bool)
    new[1:] = (rows[1:] != rows[:-1]) | (indices[1:] != indices[:-1])  # each class once per row
    rows, indices = rows[new], indices[new]
    offsets = np.searchsorted(rows, np.arange(len(names) + 1)).astype(np.int32)
    labels = pa.ListArray.from_arrays(pa.array(offsets), pa.array(indices, pa.int32()))
    return pa.table({"file_name": names, "labels": labels, "row": pa.array(np.arange(first, first + len(names)))},
                    schema=LABELS)


def label_names(names: pa.Array, source: str) -> pa.Array:
    """A labels file's file names as the listing's images are matched (`relative_paths`): a relative name as
    written, less its `.` segments (`./a/x.jpg` names a/x.jpg); an absolute path or a URI by its path below the
    source, as a script that lists a folder writes them (`/data/photos/a/x.jpg` names a/x.jpg of the source
    /data/photos)."""
    return relative_paths(plain_paths(names), source)


def labels_column(paths: pa.Array, source: str, labels: pa.Table) -> pa.Array:
    """Each path's labels (a list of class indices; null where labels has no row for it), matched by its
    path relative to the source, else by its bare file name: a join in Arrow compute."""
    names = labels.column("file_name").combine_chunks()
    at = pc.coalesce(pc.index_in(relative_paths(paths, source), value_set=names),
                     pc.index_in(file_names(paths), value_set=names))
    return labels.column("labels").combine_chunks().take(at)


def unmatched_names(paths: pa.Array, source: str, labels: pa.Table) -> int:
    """How many file names of labels match none of paths, as labels_column matches them (a typo, or paths
    below another folder): their images get no labels, unseen unless counted."""
    names = pc.unique(labels.column("file_name"))
    keys = pa.concat_arrays([relative_paths(paths, source), file_names(paths)])
    return len(names) - (pc.sum(pc.is_in(names, value_set=keys)).as_py() or 0)


def file_names(paths: pa.Array) -> pa.Array:
    """Each path's bare file name, what a label row names when it gives no folder."""
    return pc.replace_substring_regex(paths, r"^.*/", "")


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
        root = re.split(r"[*?[]", source)[0] if is_glob(source) else source
        root = root if os.path.isdir(root) else os.path.dirname(root)
    root = os.path.abspath(root).rstrip("/") + "/"
    local = pc.if_else(pc.starts_with(paths, root), pc.utf8_slice_codeunits(paths, len(root)),
                       pc.utf8_ltrim(paths, "/"))
    uris = pc.match_substring(paths, "://")
    return pc.if_else(uris, _key_names(paths), local) if pc.any(uris).as_py() else local


def _key_names(uris: pa.Array) -> pa.Array:
    """Each URI's bucket/key as a relative path that names it alone: a key may hold '.' and '..' segments (a
    folder's paths never do), which would name another file or climb out; they are escaped as in a URL, and
    '%' before them, so that the key '%2E' keeps a name of its own. A URI's credentials are no part of it."""
    if isinstance(uris, pa.ChunkedArray):
        uris = uris.combine_chunks()
    keys = pc.utf8_ltrim(pc.replace_substring_regex(uris, "^[^/]*://([^/@]*@)?", ""), "/")
    segments = pc.split_pattern(pc.replace_substring(keys, "%", "%25"), "/")
    flat = pc.list_flatten(segments)
    flat = pc.if_else(pc.equal(flat, ".."), "%2E%2E", pc.if_else(pc.equal(flat, "."), "%2E", flat))
    return pc.binary_join(pa.ListArray.from_arrays(segments.offsets, flat), "/")
