"""Set-up shared by every spawned worker process (server jobs, the zoo build's expert trainers).

Standard library only: a spawned child imports it before anything heavy."""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time


def stdout_to_stderr() -> None:
    """A worker inherits its parent's stdout, which in the server over stdio IS the MCP protocol
    stream: point file descriptor 1 at stderr, so that nothing the worker, a library or a C extension
    it calls, or a process it starts prints can corrupt the protocol."""
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def exit_when_orphaned(parent_pid: int, code: int = 3) -> None:
    """Exit at once when ``parent_pid`` is no longer the parent (it died, e.g. killed outright when
    its job was cancelled): a worker must not compute on as an orphan. Checks once a second."""
    def watch() -> None:  # pragma: no cover - only when the parent dies
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(code)

    threading.Thread(target=watch, name="esm-parent-watch", daemon=True).start()


def may_start_processes() -> bool:
    """False inside a daemonic process, which Python forbids to have children: work that would go to
    worker processes (the zoo's base peers and expert jobs) then runs in this process instead."""
    return not multiprocessing.current_process().daemon
