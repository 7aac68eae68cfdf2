"""staged_directory: whole or nothing, and the leftovers of a process killed outright are cleared."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from es_merging.staging import remove_abandoned_siblings, staged_directory


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_failure_leaves_out_as_it_was(tmp_path):
    out = tmp_path / "zoo"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_directory(out) as tmp:
            (tmp / "keep.txt").write_text("new")
            raise RuntimeError("boom")
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_abandoned_staging_of_a_dead_process_is_removed(tmp_path):
    out = tmp_path / "zoo"
    host = socket.gethostname()
    dead = tmp_path / f".zoo.tmp-{host}-{_dead_pid()}-abc_12"
    alive = tmp_path / f".zoo.tmp-{host}-{os.getpid()}-def34"  # a build still running here
    elsewhere = tmp_path / f".zoo.tmp-other-host-1-ghi56"  # made on another machine sharing the directory
    other_out = tmp_path / f".zoo2.tmp-{host}-{_dead_pid()}-jkl78"  # another output's
    for d in (dead, alive, elsewhere, other_out):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
    with staged_directory(out) as tmp:
        assert tmp.name.startswith(f".zoo.tmp-{host}-{os.getpid()}-")
        (tmp / "a").write_text("1")
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and other_out.exists()
    assert (out / "a").read_text() == "1"


def test_a_killed_writer_leaves_staging_that_the_next_run_clears(tmp_path):
    """SIGKILL runs no clean-up: the sibling stays until the next staging of the same output."""
    out = tmp_path / "zoo"
    code = ("import sys, time; from pathlib import Path; from es_merging.staging import staged_directory\n"
            "with staged_directory(Path(sys.argv[1])) as tmp:\n"
            "    (tmp / 'half').write_text('x'); print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    staged = Path(proc.stdout.readline().strip())
    assert staged.is_dir()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    assert staged.exists() and not out.exists()
    assert remove_abandoned_siblings(out) == [staged]
    assert not staged.exists()
