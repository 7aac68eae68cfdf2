"""Write a directory so that it appears whole or not at all.

The block writes into a temporary sibling of ``out``; only when it succeeds does the sibling take
``out``'s place (an existing ``out`` is moved aside first and removed after, so ``out`` is never
missing for longer than two renames). On any exception — KeyboardInterrupt and cancellation
included — the sibling is removed and ``out`` is left as it was. Callers decide beforehand whether
an existing ``out`` may be replaced (their messages differ: merge, zoo build, adaptation).

A process killed outright (SIGKILL, power loss) runs no clean-up: its sibling stays. Siblings are
named with the host and the process id that made them, and the next staging of the same ``out``
removes those whose process is gone from this host (one whose id is alive, or made on another host
sharing the directory, is left alone)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_abandoned_siblings(out: Path) -> list[Path]:
    """Remove ``out``'s staging siblings whose maker is gone from this host; returns them."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
    host, removed = socket.gethostname(), []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        match = pattern.match(path.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_owner_tag()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
