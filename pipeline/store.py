"""Where a run's files live: a local folder or a prefix of an object store (s3://, gs://), addressed alike
through pyarrow's filesystems.

Every file appears whole or not at all. Locally that takes a temporary name, an fsync and a rename. An
object store has no rename to lean on, but its put is atomic by itself (a multipart upload becomes visible
when it completes), so files are written once, under their final names.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.fs as pafs

from ..schemas.config import UserError


class StoreError(UserError):
    """An object store that cannot be reached or opened (no network, no such bucket, no credentials)."""


@dataclass(frozen=True)
class Location:
    """A file or folder on one filesystem. Picklable: Ray workers get the filesystem with its options."""

    fs: pafs.FileSystem
    path: str  # the filesystem's own path: absolute locally, bucket/key on an object store

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        """A local path, or a URI pyarrow opens (credentials and endpoint from the environment)."""
        if isinstance(where, Location):
            return where
        where = os.fspath(where)
        if "://" in where and not where.startswith("file://"):
            try:
                fs, path = pafs.FileSystem.from_uri(where)
            except (OSError, pa.ArrowInvalid) as exc:
                raise StoreError(f"cannot open {where}: {exc}") from None
            return cls(fs, path.rstrip("/"))
        return cls(pafs.LocalFileSystem(), os.path.abspath(where.removeprefix("file://")))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> Location:
        return Location(self.fs, posixpath.dirname(self.path))

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, name))

    def __str__(self) -> str:
        return self.path if self.local else f"{self.fs.type_name}://{self.path}"

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def mtime(self) -> float | None:
        """Seconds since the epoch of the last write, None when there is no such file."""
        info = self.fs.get_file_info(self.path)
        return info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def files(self, pattern: str = "*") -> list[Location]:
        """The files directly in this folder whose names match pattern, sorted; none if it does not exist."""
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((Location(self.fs, f.path) for f in found
                       if f.type == pafs.FileType.File and fnmatch(f.base_name, pattern)), key=lambda p: p.path)

    def folders(self) -> list[Location]:
        found = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((Location(self.fs, f.path) for f in found if f.type == pafs.FileType.Directory),
                      key=lambda p: p.path)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def unlink(self) -> None:
        """Remove the file; nothing to do when it is gone already."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def move(self, target: Location) -> None:
        """A rename locally; a copy, then a delete, on an object store."""
        target.parent.mkdir()
        self.fs.move(self.path, target.path)

    def put_file(self, local: Path) -> None:
        """A local file moved here whole: a rename on the same disk, an upload (then a delete) otherwise."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            os.replace(local, self.path)
            return
        pafs.copy_files(str(local), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)
        Path(local).unlink()

    def write_bytes(self, data: bytes, durable: bool = True) -> None:
        """The file replaced by data whole, or left as it was (durable: fsync'd before the rename)."""
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        with atomic_file(Path(self.path), "wb", durable) as f:
            f.write(data)


@contextmanager
def atomic_file(path: Path, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """A local file written under a temporary name beside `path` and renamed onto it only when the block
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
