"""The output's lease: one live run at a time, a dead holder's lease taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest
from camlabel.pipeline.lease import LEASE_FILE, STALE_AFTER_S, lease
from camlabel.schemas.config import ConfigError


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def holder(tmp_path, host, pid, age_s=0.0):
    path = tmp_path / LEASE_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "theirs", "since": "earlier"}))
    os.utime(path, (path.stat().st_atime - age_s, path.stat().st_mtime - age_s))
    return path


def test_a_live_holder_keeps_the_output_and_the_lease_goes_when_the_run_ends(tmp_path):
    with lease(tmp_path):
        assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match=rf"out: .* is in use by the run of pid {os.getpid()} on "):
            with lease(tmp_path):
                pass
    assert not (tmp_path / LEASE_FILE).exists()


def test_the_folders_made_for_the_lease_go_if_the_run_leaves_them_empty(tmp_path):
    """A run refused as it plans (a bad labels file) left its new, empty output folder behind."""
    out = tmp_path / "new" / "out"
    with pytest.raises(ConfigError, match="refused"):
        with lease(out):
            assert (out / LEASE_FILE).is_file()
            raise ConfigError("refused")
    assert list(tmp_path.iterdir()) == []
    with lease(out):
        (out / "manifest.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    (tmp_path / "made_before").mkdir()
    with lease(tmp_path / "made_before"):
        pass
    assert (tmp_path / "made_before").is_dir()  # a folder that was there stays, empty or not


def test_a_dead_holder_on_this_host_or_a_silent_one_elsewhere_is_taken_over(tmp_path):
    for path in (holder(tmp_path, socket.gethostname(), dead_pid()),
                 holder(tmp_path, "other-node", 1, age_s=STALE_AFTER_S + 5)):
        with lease(tmp_path):
            assert json.loads(path.read_text())["pid"] == os.getpid()
    holder(tmp_path, "other-node", 1, age_s=10)  # renewed 10 s ago: alive
    with pytest.raises(ConfigError, match="in use by the run of pid 1 on other-node"):
        with lease(tmp_path):
            pass
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "theirs"  # untouched


def test_annotate_refuses_an_output_in_use_in_one_line(tmp_path, capsys):
    from camlabel.pipeline.cli import main

    (tmp_path / "out").mkdir()
    holder(tmp_path / "out", socket.gethostname(), os.getpid())
    assert main(["annotate", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is in use by the run of pid" in err


def test_annotate_refuses_an_output_it_cannot_create_in_one_line(tmp_path, capsys):
    from camlabel.pipeline.cli import main

    (tmp_path / "a_file").write_text("")
    assert main(["annotate", str(tmp_path), "--out", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"camlabel annotate: out: cannot create {tmp_path / 'a_file'}")
