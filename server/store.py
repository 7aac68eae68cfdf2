"""SQLite registry of jobs, probes, experts and models, kept in the data home.

One connection shared by every thread behind a lock (WAL journal, so readers in other processes
never block). On open, jobs left ``running`` or ``queued`` by a server that is no longer alive are
marked ``interrupted`` and their staging directories removed: after a restart the finished jobs
are still listed and nothing pretends to run.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    state TEXT NOT NULL,
    stage TEXT,
    done REAL NOT NULL DEFAULT 0,
    total REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    stage_started_at REAL,
    finished_at REAL,
    params TEXT NOT NULL DEFAULT '{}',
    result TEXT,
    error TEXT,
    owner_pid INTEGER,
    worker_pid INTEGER,
    staging_dir TEXT
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS probes (
    id TEXT PRIMARY KEY,
    name TEXT,
    path TEXT NOT NULL,
    hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS experts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    modality TEXT,
    kind TEXT NOT NULL,
    base_hash TEXT,
    rank INTEGER,
    source TEXT NOT NULL DEFAULT 'user',
    created_at REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    created_at REAL NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}'
);
"""

_JSON_FIELDS = {"params", "result", "summary", "meta"}


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_FIELDS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(_SCHEMA)
            self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self.recovered: list[str] = self._recover()

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except sqlite3.ProgrammingError:  # pragma: no cover
                pass

    def _exec(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._conn.execute(sql, args)

    def _one(self, sql: str, args: tuple | list = ()) -> dict[str, Any] | None:
        with self._lock:
            return _row(self._conn.execute(sql, args).fetchone())

    def _all(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [_row(r) for r in self._conn.execute(sql, args).fetchall()]  # type: ignore[misc]

    def _recover(self) -> list[str]:
        """Mark jobs whose server died as interrupted; remove their staging directories."""
        me = os.getpid()
        stale = [
            j for j in self._all("SELECT id, owner_pid, worker_pid, staging_dir FROM jobs WHERE state IN (?, ?)", ACTIVE_STATES)
            if j["owner_pid"] == me or not _pid_alive(j["owner_pid"])
        ]
        now = time.time()
        for job in stale:
            if job["worker_pid"] and job["worker_pid"] != me and _pid_alive(job["worker_pid"]):
                # an orphaned worker of a dead server: it watches its parent and exits by itself,
                # but do not leave it running if it did not
                try:
                    os.kill(job["worker_pid"], 15)
                except OSError:  # pragma: no cover
                    pass
            if job["staging_dir"]:
                shutil.rmtree(job["staging_dir"], ignore_errors=True)
            self._exec(
                "UPDATE jobs SET state='interrupted', finished_at=?, "
                "error=COALESCE(error, 'the server stopped while this job was active; start it again') "
                "WHERE id=? AND state IN (?, ?)",
                (now, job["id"], *ACTIVE_STATES),
            )
        if stale:
            log.info("marked %d job(s) interrupted after a restart", len(stale))
        return [j["id"] for j in stale]

    # ------------------------------------------------------------------ jobs
    def add_job(self, job_id: str, kind: str, params: dict[str, Any], *, name: str | None = None,
                staging_dir: str | None = None) -> dict[str, Any]:
        self._exec(
            "INSERT INTO jobs (id, kind, name, state, created_at, params, owner_pid, staging_dir) "
            "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
            (job_id, kind, name, time.time(), json.dumps(params), os.getpid(), staging_dir),
        )
        return self.get_job(job_id)  # type: ignore[return-value]

    def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        cols = []
        vals = []
        for key, value in fields.items():
            cols.append(f"{key}=?")
            vals.append(json.dumps(value) if key in _JSON_FIELDS and value is not None else value)
        self._exec(f"UPDATE jobs SET {', '.join(cols)} WHERE id=?", (*vals, job_id))

    def finish_job(self, job_id: str, state: str, *, result: dict[str, Any] | None = None,
                   error: str | None = None) -> bool:
        """Move an active job to a final state; False if it was already final."""
        assert state in FINAL_STATES
        with self._lock:
            cur = self._conn.execute(
                "UPDATE jobs SET state=?, result=COALESCE(?, result), error=?, finished_at=? "
                "WHERE id=? AND state IN (?, ?)",
                (state, json.dumps(result) if result is not None else None, error, time.time(), job_id, *ACTIVE_STATES),
            )
            return cur.rowcount > 0

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM jobs WHERE id=?", (job_id,))

    def list_jobs(self, *, limit: int = 20, offset: int = 0, kind: str | None = None,
                  state: str | None = None) -> tuple[list[dict[str, Any]], int]:
        where, args = [], []
        if kind:
            where.append("kind=?")
            args.append(kind)
        if state:
            where.append("state=?")
            args.append(state)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self._one(f"SELECT COUNT(*) AS n FROM jobs {clause}", args)["n"]  # type: ignore[index]
        rows = self._all(f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, id LIMIT ? OFFSET ?", (*args, limit, offset))
        return rows, total

    # ------------------------------------------------------------------ probes
    def add_probe(self, probe_id: str, *, name: str | None, path: str, hash: str, summary: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO probes (id, name, path, hash, created_at, summary) VALUES (?, ?, ?, ?, ?, ?)",
            (probe_id, name, path, hash, time.time(), json.dumps(summary)),
        )

    def get_probe(self, probe_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM probes WHERE id=?", (probe_id,))

    def list_probes(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM probes ORDER BY created_at DESC")

    # ------------------------------------------------------------------ experts
    def add_expert(self, expert_id: str, *, name: str, path: str, modality: str | None, kind: str,
                   base_hash: str | None, rank: int | None, source: str = "user",
                   meta: dict[str, Any] | None = None) -> None:
        self._exec(
            "INSERT INTO experts (id, name, path, modality, kind, base_hash, rank, source, created_at, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (expert_id, name, path, modality, kind, base_hash, rank, source, time.time(), json.dumps(meta or {})),
        )

    def get_expert(self, expert_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM experts WHERE id=?", (expert_id,))

    def find_expert_by_path(self, path: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM experts WHERE path=?", (path,))

    def list_experts(self, modality: str | None = None) -> list[dict[str, Any]]:
        if modality:
            return self._all("SELECT * FROM experts WHERE modality=? ORDER BY created_at, id", (modality,))
        return self._all("SELECT * FROM experts ORDER BY created_at, id")

    def count_experts(self) -> int:
        return self._one("SELECT COUNT(*) AS n FROM experts")["n"]  # type: ignore[index]

    # ------------------------------------------------------------------ models
    def add_model(self, model_id: str, *, name: str, path: str, kind: str, job_id: str | None = None,
                  meta: dict[str, Any] | None = None, replace: bool = False) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._exec(
            f"{verb} INTO models (id, name, path, kind, job_id, created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (model_id, name, path, kind, job_id, time.time(), json.dumps(meta or {})),
        )

    def get_model(self, model_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM models WHERE id=?", (model_id,))

    def list_models(self, *, kind: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        clause, args = ("WHERE kind=?", [kind]) if kind else ("", [])
        total = self._one(f"SELECT COUNT(*) AS n FROM models {clause}", args)["n"]  # type: ignore[index]
        rows = self._all(f"SELECT * FROM models {clause} ORDER BY created_at, id LIMIT ? OFFSET ?", (*args, limit, offset))
        return rows, total

    def id_taken(self, table: str, ident: str) -> bool:
        assert table in {"experts", "models", "probes", "jobs"}
        return self._one(f"SELECT 1 AS x FROM {table} WHERE id=?", (ident,)) is not None

    def unique_id(self, table: str, wanted: str) -> str:
        """``wanted`` if free, else ``wanted-2``, ``wanted-3``, ..."""
        candidate, n = wanted, 1
        while self.id_taken(table, candidate):
            n += 1
            suffix = f"-{n}"
            candidate = wanted[: 64 - len(suffix)] + suffix
        return candidate
