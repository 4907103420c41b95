"""What earlier runs of a series annotated, by content: an image seen before under another name is named as
a duplicate, not annotated again, and no actor holds the series in memory.

The planning task writes into the run directory HASHES, the first 8 bytes of every earlier image's sha256
(its image_id), sorted, 8 bytes an image; and IMAGES, their image_id and path in the same order. An actor
memory-maps the hashes (the actors of a node share them through the page cache), finds a part's hashes
by binary search, and only for a hit (rare) reads the row group of IMAGES that holds it, to confirm the
whole sha256 and name the earlier image. Both files go when the run finishes.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .store import Location

HASHES = "earlier-hashes.u64"
IMAGES = "earlier-images.parquet"
SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string())])
ROW_GROUP = 8192  # images per row group of IMAGES: one is read per hit


def hash_prefixes(image_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 of the first 16 hex digits of each sha256 hex digest, vectorised (no loop over images)."""
    if isinstance(image_ids, pa.ChunkedArray):
        image_ids = image_ids.combine_chunks()
    head = pc.utf8_slice_codeunits(image_ids, 0, 16).cast(pa.binary()).cast(pa.binary(16))
    ascii_ = np.frombuffer(head.buffers()[1], np.uint8)[16 * head.offset : 16 * (head.offset + len(head))]
    nibbles = ascii_.reshape(-1, 16).astype(np.uint64) - ord("0")
    nibbles[nibbles > 9] -= ord("a") - ord("0") - 10
    return (nibbles << (4 * np.arange(15, -1, -1, dtype=np.uint64))).sum(1, dtype=np.uint64)


class EarlierContents:
    """The earlier runs' contents as the planning task wrote them into `run_dir`."""

    def __init__(self, run_dir: Location) -> None:
        hashes = run_dir / HASHES
        if not run_dir.local:  # an object store: one download per actor, then mapped like a local file
            self._copy = tempfile.NamedTemporaryFile(prefix="camlabel-contents-")
            pafs.copy_files(hashes.path, self._copy.name, source_filesystem=hashes.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            hashes = Location.of(self._copy.name)
        size = hashes.fs.get_file_info(hashes.path).size
        self.hashes = np.memmap(hashes.path, "<u8", mode="r") if size else np.empty(0, np.uint64)
        self.images = pq.ParquetFile((run_dir / IMAGES).path, filesystem=run_dir.fs)
        groups = [self.images.metadata.row_group(g).num_rows for g in range(self.images.num_row_groups)]
        self.starts = np.cumsum([0, *groups])

    def earlier_paths(self, image_ids: list[str]) -> list[str | None]:
        """For each image_id, the path of an earlier image with the same content, or None."""
        keys = hash_prefixes(pa.array(image_ids, pa.string()))
        first = np.searchsorted(self.hashes, keys, "left")
        last = np.searchsorted(self.hashes, keys, "right")
        found: list[str | None] = [None] * len(image_ids)
        for i in np.nonzero(last > first)[0]:  # the same 8 bytes: read those rows to compare all 32
            rows = self._rows(int(first[i]), int(last[i]))
            same = pc.equal(rows.column("image_id"), image_ids[i])
            found[i] = next(iter(rows.filter(same).column("path").to_pylist()), None)
        return found

    def _rows(self, start: int, stop: int) -> pa.Table:
        groups = range(int(np.searchsorted(self.starts, start, "right")) - 1,
                       int(np.searchsorted(self.starts, stop, "left")))
        table = self.images.read_row_groups(list(groups), columns=["image_id", "path"])
        return table.slice(start - int(self.starts[groups[0]]), stop - start)
