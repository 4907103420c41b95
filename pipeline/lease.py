"""One run at a time per output: a lease file in the output root, taken over once its holder is dead.

Two scheduled runs on one output would annotate the same images twice. The lease names its holder
(host, pid); a holder on this host is dead when its pid is gone, a holder elsewhere when it has not
renewed the lease (its file's mtime) for STALE_AFTER_S.
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

log = logging.getLogger(__name__)
LEASE_FILE = ".camlabel-lease.json"
RENEW_EVERY_S = 60.0
STALE_AFTER_S = 600.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # gone meanwhile, or cut short by a crash: nobody holds it
        return None


def _stale(path: Path, holder: dict | None) -> bool:
    if holder is None:
        return True
    if holder.get("host") == socket.gethostname():
        return not _alive(int(holder.get("pid", 0)))
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return True


def _take(path: Path, me: dict) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    return True


@contextmanager
def lease(root: Path) -> Iterator[None]:
    """Hold root's lease for the block, renewing it in a background thread; refuse (ConfigError, which
    exits 2) while a live holder has it."""
    path = Path(root) / LEASE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
          "since": datetime.now(UTC).isoformat()}
    while not _take(path, me):
        holder = _holder(path)
        if not _stale(path, holder):
            raise ConfigError(f"out: {root} is in use by the run of pid {holder['pid']} on {holder['host']} since "
                              f"{holder.get('since')}; wait for it, or remove {path} if that run is gone")
        log.warning("taking over the lease of a run that is gone: %s", holder)
        path.unlink(missing_ok=True)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(RENEW_EVERY_S):
            try:
                os.utime(path)
            except FileNotFoundError:
                return

    renewer = threading.Thread(target=renew, name="camlabel-lease", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        if (_holder(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)
