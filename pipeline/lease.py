"""One run at a time per output: a lease file in the output root, taken over once its holder is dead.

Two scheduled runs on one output would annotate the same images twice. The lease names its holder
(host, pid); a holder on this host is dead when its pid is gone, a holder elsewhere when it has not
renewed the lease (rewritten its file) for STALE_AFTER_S.

Locally the lease is created exclusively (O_EXCL). An object store offers no exclusive create through
pyarrow (S3's conditional put is not exposed: apache/arrow#44281), so there the lease is written, left
to settle for SETTLE_S and read back: of two runs that raced, only the one whose token it reads back
goes on (the other would have to take longer than SETTLE_S between finding no lease and writing its own
to slip past).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ..schemas.config import ConfigError
from .store import Location

log = logging.getLogger(__name__)
LEASE_FILE = ".camlabel-lease.json"
RENEW_EVERY_S = 60.0
STALE_AFTER_S = 600.0
SETTLE_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(path: Location) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # gone meanwhile, or cut short by a crash: nobody holds it
        return None


def _stale(path: Location, holder: dict | None) -> bool:
    if holder is None:
        return True
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", 0)))
    renewed = path.mtime()
    return renewed is None or time.time() - renewed > STALE_AFTER_S


def _take(path: Location, me: dict) -> bool:
    data = json.dumps(me).encode()
    if path.local:
        try:
            fd = os.open(path.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if path.is_file():
        return False
    path.write_bytes(data)
    time.sleep(SETTLE_S)
    return _ours(path, me)


def _ours(path: Location, me: dict) -> bool:
    return (_holder(path) or {}).get("token") == me["token"]


@contextmanager
def lease(root: Path | Location) -> Iterator[None]:
    """Hold root's lease for the block, renewing it in a background thread; refuse (ConfigError, which
    exits 2) while a live holder has it. The local folders made to hold the lease go again if the block leaves
    them empty: a run refused as it plans (a bad labels file) leaves no empty output behind."""
    path = Location.of(root) / LEASE_FILE
    made = _missing_folders(path.parent)
    try:
        path.parent.mkdir()
    except OSError as exc:  # a file by that name, a read-only or missing parent
        raise ConfigError(f"out: cannot create {root}: {exc}") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
          "since": datetime.now(UTC).isoformat()}
    while not _take(path, me):
        holder = _holder(path)
        if not _stale(path, holder):
            raise ConfigError(f"out: {root} is in use by the run of pid {holder['pid']} on {holder['host']} since "
                              f"{holder.get('since')}; wait for it, or remove {path} if that run is gone")
        log.warning("taking over the lease of a run that is gone: %s", holder)
        path.unlink()
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_EVERY_S) and _ours(path, me):
            path.write_bytes(json.dumps(me).encode())

    renewer = threading.Thread(target=renew, name="camlabel-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        if _ours(path, me):
            path.unlink()
        for folder in made:  # innermost first; one that holds anything stays, and so do those above it
            try:
                folder.rmdir()
            except OSError:
                break


def _missing_folders(folder: Location) -> list[Path]:
    """The local folders that making `folder` creates, innermost first (an object store's are not folders)."""
    missing = []
    path = Path(folder.path)
    while folder.local and not path.exists():
        missing.append(path)
        path = path.parent
    return missing
