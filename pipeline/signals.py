"""Stopping a run on SIGTERM or SIGINT: commit what is finished, say so in one line, exit plainly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived mid-run; every finished part is committed and the run is resumable.
    A BaseException, like KeyboardInterrupt: no `except Exception` on the way (Ray Data's among them)
    mistakes it for a failure and logs a stack trace."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal = signal_name
        self.kept = 0
        self.run_dir: Path | None = None


@contextmanager
def stopped_by_signals() -> Iterator[None]:
    """SIGTERM (Kubernetes, `ray job stop`) and SIGINT raise Stopped in the driver's main thread, so the
    job commits what it has and leaves with one line. Installed after Ray starts: Ray's own handler
    would otherwise abort the process with a stack dump, or swallow the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        for s in STOP_SIGNALS:  # a second signal during the clean-up must not interrupt it
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    stop.stops_camlabel = True
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def kept_from_ray() -> Iterator[None]:
    """ray.init sets its own SIGTERM handler, sys.exit(15): no word, no record. Under a stop handler of ours,
    a SIGTERM while Ray starts stops the command as any other does, and our handler is put back after."""
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    ours = threading.current_thread() is threading.main_thread() and any(
        getattr(handler, "stops_camlabel", False) for handler in before.values())
    try:
        yield
    except SystemExit as exc:
        if ours and exc.code == signal.SIGTERM:
            raise Stopped(signal.SIGTERM.name) from None
        raise
    finally:
        if ours:
            for s, handler in before.items():
                signal.signal(s, handler)
