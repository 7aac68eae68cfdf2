"""Long-running work (merges, screens, building the zoo) in worker PROCESSES.

Each job:
- gets a high-entropy id (``secrets.token_urlsafe``) and a row in the store;
- runs ``target(params, progress=..., cancel=..., workdir=...)`` in a fresh process of the
  multiprocessing ``spawn`` context (no inherited locks or torch state; killable at any moment),
  niced and with a bounded number of torch threads so the server keeps answering;
- reports ``(stage, done, total)`` through a pipe; the runner keeps the live state in memory and
  writes it to the store at most every 0.5 s (and at every stage change);
- writes only inside its own staging directory ``<parent>/.esm-job-<id>/`` placed next to where the
  artifact will live; on success the parent process moves the artifact into place with one
  ``rename`` (``on_success`` hook), then the staging directory is removed. A cancelled, failed or
  interrupted job therefore never leaves a partial artifact, whatever the work did inside.

Job kinds are registered with :func:`register_job_kind` (the documented hook; tests use it to add a
small ``selftest`` kind). The target is given as ``"module:function"`` so the spawned child can
import it; it must be importable without side effects.

This module imports only the standard library at the top (and es_merging.worker_process, which does
too): the spawned child imports it first.
As with any ``spawn`` start method, a script that creates the server itself must keep its start-up
code under ``if __name__ == "__main__":`` (the child re-imports the parent's main module).
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from es_merging.worker_process import exit_when_orphaned, stdout_to_stderr  # stdlib only, like this module

log = logging.getLogger(__name__)

STAGING_PREFIX = ".esm-job-"
PROGRESS_WRITE_INTERVAL_S = 0.5
CANCEL_GRACE_S = 1.0


class JobCancelled(Exception):
    """Raised inside a worker by ``cancel.raise_if_set()`` when the job was cancelled."""


@dataclass(frozen=True)
class JobKind:
    name: str
    target: str  # "module:function", run in the worker process
    # runs in the SERVER process after the work succeeded: (runner, job_row, result) -> public result
    on_success: Callable[["JobRunner", dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    description: str = ""


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(name: str, target: str, on_success: Callable[..., dict[str, Any]] | None = None,
                      description: str = "", *, replace: bool = False) -> JobKind:
    """Register a kind of job. ``target`` is ``"module:function"`` with the signature
    ``fn(params: dict, *, progress, cancel, workdir: Path) -> dict`` (JSON-serialisable result);
    ``progress(stage, done, total)`` reports progress, ``cancel()`` is True once cancellation was
    asked (``cancel.raise_if_set()`` raises :class:`JobCancelled`), ``workdir`` is the job's staging
    directory, the only place the work may write."""
    if ":" not in target:
        raise ValueError(f"job target {target!r} must be 'module:function'")
    if name in JOB_KINDS and not replace:
        raise ValueError(f"job kind {name!r} is already registered")
    kind = JobKind(name=name, target=target, on_success=on_success, description=description)
    JOB_KINDS[name] = kind
    return kind


# ============================================================================ worker side


class CancelFlag:
    """What the work sees as ``cancel``: callable (True once cancelled) and Event-like."""

    def __init__(self, event: Any):
        self._event = event

    def __call__(self) -> bool:
        return self._event.is_set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def raise_if_set(self) -> None:
        if self._event.is_set():
            raise JobCancelled("cancelled")


class _Channel:
    """The child's end of the result pipe; thread-safe ``put``."""

    def __init__(self, conn: Any):
        self._conn = conn
        self._lock = threading.Lock()

    def put(self, msg: tuple) -> None:
        with self._lock:
            self._conn.send(msg)


class _Progress:
    def __init__(self, q: _Channel, min_interval: float = 0.1):
        self._q = q
        self._last_stage: str | None = None
        self._last_put = 0.0
        self._min_interval = min_interval

    def __call__(self, stage: str, done: float = 0, total: float = 0) -> None:
        now = time.time()
        stage = str(stage)
        if stage == self._last_stage and now - self._last_put < self._min_interval and done < total:
            return
        self._last_stage, self._last_put = stage, now
        self._q.put(("progress", stage, float(done), float(total), now))


def _worker_main(target: str, params: dict[str, Any], workdir: str, conn: Any, cancel_event: Any,
                 threads: int, nice: int, log_level: int) -> None:
    """Entry point of the spawned worker process."""
    stdout_to_stderr()
    q = _Channel(conn)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=log_level, stream=sys.stderr, format="%(levelname)s job %(name)s: %(message)s")
    exit_when_orphaned(os.getppid())
    if nice:
        try:
            os.nice(nice)
        except OSError:  # pragma: no cover
            pass
    try:
        module_name, func_name = target.split(":", 1)
        fn = getattr(importlib.import_module(module_name), func_name)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        result = fn(params, progress=_Progress(q), cancel=CancelFlag(cancel_event), workdir=Path(workdir))
        q.put(("done", result if isinstance(result, dict) else {"value": result}))
    except JobCancelled:
        q.put(("cancelled",))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent
        from_library = False
        try:
            from es_merging.errors import EsMergingError

            from_library = isinstance(exc, EsMergingError)
        except Exception:  # pragma: no cover
            pass
        if from_library:
            q.put(("error", type(exc).__name__, str(exc), ""))
        else:
            q.put(("crash", type(exc).__name__, str(exc), traceback.format_exc()))
    finally:
        try:
            conn.close()
        except Exception:  # pragma: no cover
            pass


# ============================================================================ server side


@dataclass
class _Live:
    proc: Any = None
    queue: Any = None
    cancel_event: Any = None
    monitor: threading.Thread | None = None
    stage: str | None = None
    stage_index: int = 0
    done: float = 0.0
    total: float = 0.0
    stage_started_at: float | None = None
    last_write: float = 0.0
    cancel_requested: bool = False
    shutdown: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


def eta_seconds(row: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds left in the current stage, extrapolated from its progress so far."""
    if row.get("state") != "running":
        return None
    done, total, start = row.get("done") or 0, row.get("total") or 0, row.get("stage_started_at")
    if not start or done <= 0 or total <= 0 or done >= total:
        return None
    elapsed = (now or time.time()) - start
    return round(elapsed * (total - done) / done, 1)


class JobRunner:
    def __init__(self, store: Any, *, max_jobs: int = 1, worker_threads: int = 1, worker_nice: int = 5,
                 jobs_dir: Path | None = None):
        self.store = store
        self.max_jobs = max_jobs
        self.worker_threads = worker_threads
        self.worker_nice = worker_nice
        self.jobs_dir = jobs_dir
        self._ctx = mp.get_context("spawn")
        self._live: dict[str, _Live] = {}
        self._lock = threading.RLock()
        self._closed = False
        self.context: dict[str, Any] = {}  # shared objects for on_success hooks (settings, state)

    # ------------------------------------------------------------------ public API
    def submit(self, kind: str, params: dict[str, Any], *, name: str | None = None,
               staging_parent: Path | None = None) -> dict[str, Any]:
        if kind not in JOB_KINDS:
            raise KeyError(f"unknown job kind {kind!r}")
        if self._closed:
            raise RuntimeError("the job runner is shut down")
        job_id = secrets.token_urlsafe(16)
        parent = Path(staging_parent or self.jobs_dir or Path.cwd())
        staging = parent / f"{STAGING_PREFIX}{job_id}"
        self.store.add_job(job_id, kind, params, name=name, staging_dir=str(staging))
        self._schedule()
        return self.get(job_id)  # type: ignore[return-value]

    def get(self, job_id: str) -> dict[str, Any] | None:
        row = self.store.get_job(job_id)
        if row is None:
            return None
        with self._lock:
            live = self._live.get(job_id)
            if live is not None and row["state"] == "running":
                row.update(stage=live.stage, done=live.done, total=live.total,
                           stage_started_at=live.stage_started_at)
                row["stage_index"] = live.stage_index
                row["cancel_requested"] = live.cancel_requested
        row["eta_s"] = eta_seconds(row)
        return row

    def running_ids(self) -> list[str]:
        with self._lock:
            return list(self._live)

    def cancel(self, job_id: str, *, wait_s: float = 15.0) -> dict[str, Any] | None:
        """Stop a job. Queued: never starts. Running: the work is asked to stop, then its process
        is terminated after a short grace period; its staging directory is removed. Final: no-op."""
        row = self.store.get_job(job_id)
        if row is None:
            return None
        if row["state"] == "queued":
            if self.store.finish_job(job_id, "cancelled", error="cancelled before it started"):
                self._remove_staging(row)
            return self.get(job_id)
        with self._lock:
            live = self._live.get(job_id)
            if live is not None:
                live.cancel_requested = True
        if live is None:
            return self.get(job_id)
        self._stop_process(live, grace=CANCEL_GRACE_S)
        live.finished.wait(wait_s)
        return self.get(job_id)

    def close(self) -> None:
        """Stop every running job (marked interrupted) and refuse new ones."""
        self._closed = True
        with self._lock:
            lives = list(self._live.items())
        for _, live in lives:
            live.shutdown = True
            self._stop_process(live, grace=0.2)
        for _, live in lives:
            live.finished.wait(10)
        # jobs still queued will never run under this server
        rows, _ = self.store.list_jobs(limit=100_000, state="queued")
        for row in rows:
            if row["owner_pid"] == os.getpid():
                self.store.finish_job(row["id"], "interrupted", error="the server stopped before this job started; start it again")
                self._remove_staging(row)

    # ------------------------------------------------------------------ internals
    def _schedule(self) -> None:
        with self._lock:
            if self._closed:
                return
            free = self.max_jobs - len(self._live)
            if free <= 0:
                return
            rows, _ = self.store.list_jobs(limit=1000, state="queued")
            mine = [r for r in reversed(rows) if r["owner_pid"] == os.getpid() and r["id"] not in self._live]
            for row in mine[:free]:
                self._start(row)

    def _start(self, row: dict[str, Any]) -> None:
        job_id = row["id"]
        kind = JOB_KINDS.get(row["kind"])
        if kind is None:
            self.store.finish_job(job_id, "failed", error=f"job kind {row['kind']!r} is not known to this server")
            return
        staging = Path(row["staging_dir"])
        try:
            staging.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            self.store.finish_job(job_id, "failed", error=f"cannot create the staging directory {staging}: {exc}")
            return
        q, child_end = self._ctx.Pipe(duplex=False)
        cancel_event = self._ctx.Event()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(kind.target, row["params"], str(staging), child_end, cancel_event, self.worker_threads,
                  self.worker_nice, logging.getLogger().getEffectiveLevel()),
            name=f"esm-job-{job_id[:8]}",
            daemon=False,
        )
        now = time.time()
        live = _Live(proc=proc, queue=q, cancel_event=cancel_event, stage="starting", stage_started_at=now)
        self._live[job_id] = live
        self.store.update_job(job_id, state="running", stage="starting", started_at=now, stage_started_at=now)
        try:
            proc.start()
        except Exception as exc:  # e.g. started from a daemonic process, or out of resources
            with self._lock:
                self._live.pop(job_id, None)
            child_end.close()
            q.close()
            self.store.finish_job(job_id, "failed", error=f"cannot start a worker process ({type(exc).__name__}: {exc})")
            self._remove_staging(row)
            log.exception("job %s: worker did not start", job_id)
            return
        child_end.close()  # the child holds the only write end: its death is EOF here
        self.store.update_job(job_id, worker_pid=proc.pid)
        live.monitor = threading.Thread(target=self._monitor, args=(job_id, live), name=f"esm-monitor-{job_id[:8]}", daemon=True)
        live.monitor.start()
        log.info("job %s (%s) started in process %s", job_id, row["kind"], proc.pid)

    def _stop_process(self, live: _Live, grace: float) -> None:
        """Ask, then terminate, then kill. Only the monitor thread reaps the process."""
        from multiprocessing.connection import wait as mp_wait

        if live.cancel_event is not None:
            live.cancel_event.set()
        proc = live.proc
        if proc is None or proc.pid is None:
            return
        if not mp_wait([proc.sentinel], grace):
            proc.terminate()
            if not mp_wait([proc.sentinel], 5):  # pragma: no cover - SIGTERM ignored
                proc.kill()

    def _handle_progress(self, job_id: str, live: _Live, stage: str, done: float, total: float, t: float) -> None:
        with self._lock:
            changed = stage != live.stage
            if changed:
                live.stage, live.stage_index, live.stage_started_at = stage, live.stage_index + 1, t
            live.done, live.total = done, total
        if changed:
            log.info("job %s: stage %s (%g/%g)", job_id[:8], stage, done, total)
        now = time.time()
        if changed or now - live.last_write >= PROGRESS_WRITE_INTERVAL_S or (total and done >= total):
            live.last_write = now
            self.store.update_job(job_id, stage=stage, done=done, total=total, stage_started_at=live.stage_started_at)

    def _monitor(self, job_id: str, live: _Live) -> None:
        outcome: tuple = ("crash", "", "", "")
        got_final = False
        proc, q = live.proc, live.queue
        try:
            while True:
                try:
                    if not q.poll(0.5):
                        continue
                    msg = q.recv()
                except (EOFError, OSError):  # the child is gone
                    break
                except Exception:  # a message cut short by a kill  # pragma: no cover
                    break
                if msg[0] == "progress":
                    self._handle_progress(job_id, live, *msg[1:])
                else:
                    outcome, got_final = msg, True
                    break
            proc.join(10 if got_final else 1)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            self._finalize(job_id, live, outcome if got_final else None)
        except Exception:  # pragma: no cover - a bug here must not leave the job running
            log.exception("monitor of job %s failed", job_id)
            self.store.finish_job(job_id, "failed", error="internal error while following the job (see server log)")
        finally:
            row = self.store.get_job(job_id)
            if row is not None:
                self._remove_staging(row)
            try:
                q.close()
            except Exception:  # pragma: no cover
                pass
            with self._lock:
                self._live.pop(job_id, None)
            live.finished.set()
            self._schedule()

    def _finalize(self, job_id: str, live: _Live, outcome: tuple | None) -> None:
        row = self.store.get_job(job_id)
        if row is None:  # pragma: no cover
            return
        if live.shutdown:
            self.store.finish_job(job_id, "interrupted", error="the server stopped while this job ran; start it again")
            return
        if live.cancel_requested:
            self.store.finish_job(job_id, "cancelled", error="cancelled by request")
            log.info("job %s cancelled", job_id)
            return
        if outcome is None:
            code = live.proc.exitcode
            self.store.finish_job(job_id, "failed", error=f"the worker process ended unexpectedly (exit code {code})")
            return
        tag = outcome[0]
        if tag == "done":
            result = outcome[1]
            kind = JOB_KINDS.get(row["kind"])
            try:
                public = kind.on_success(self, row, result) if kind and kind.on_success else result
            except Exception as exc:
                from_library = type(exc).__module__.startswith("es_merging")
                msg = str(exc) if from_library else f"finishing the job failed ({type(exc).__name__})"
                if not from_library:
                    log.exception("on_success of job %s failed", job_id)
                self.store.finish_job(job_id, "failed", error=msg)
                return
            self.store.update_job(job_id, stage="done", done=live.total or 1, total=live.total or 1)
            self.store.finish_job(job_id, "succeeded", result=public)
            log.info("job %s succeeded", job_id)
        elif tag == "cancelled":
            self.store.finish_job(job_id, "cancelled", error="cancelled by request")
        elif tag == "error":
            self.store.finish_job(job_id, "failed", error=f"{outcome[2]}")
        else:
            log.error("job %s crashed: %s: %s\n%s", job_id, outcome[1], outcome[2], outcome[3])
            self.store.finish_job(job_id, "failed", error=f"internal error in the job ({outcome[1]}); see the server log")

    def _remove_staging(self, row: dict[str, Any]) -> None:
        staging = row.get("staging_dir")
        if staging and Path(staging).name.startswith(STAGING_PREFIX):
            shutil.rmtree(staging, ignore_errors=True)


# ============================================================================ built-in work


def selftest_work(params: dict[str, Any], *, progress, cancel, workdir: Path) -> dict[str, Any]:
    """A small job for tests and diagnostics: writes ``steps`` files into ``workdir/out`` one per
    ``delay`` seconds, reporting progress; fails on purpose with ``fail=True``."""
    steps = int(params.get("steps", 5))
    delay = float(params.get("delay", 0.05))
    out = workdir / "out"
    out.mkdir()
    if params.get("print"):  # diagnostics: where does a job's printed output go? (stderr, never stdout)
        sys.stdout.write(params["print"] + "\n")
        sys.stdout.flush()
        os.write(1, f"{params['print']} (fd 1)\n".encode())
    for i in range(steps):
        cancel.raise_if_set()
        (out / f"part-{i:03d}.txt").write_text(f"step {i}\n")
        progress("working", i + 1, steps)
        time.sleep(delay)
    if params.get("fail"):
        from es_merging.errors import MergeError

        raise MergeError("selftest asked to fail")
    return {"staged": str(out), "steps": steps}


def merge_work(params: dict[str, Any], *, progress, cancel, workdir: Path) -> dict[str, Any]:
    """Run ``es_merging.merge_api.run_merge`` into the staging directory."""
    from es_merging.merge_api import run_merge
    from es_merging.options import MergeOptions

    options = dict(params["options"])
    options["out"] = str(workdir / "model")
    options["overwrite"] = False
    opts = MergeOptions.model_validate(options)
    result = run_merge(opts, progress=progress, cancel=cancel)
    out_dir = Path(getattr(result, "out_dir", None) or (result.get("out_dir") if isinstance(result, dict) else opts.out))
    return {"staged": str(out_dir)}


def screen_work(params: dict[str, Any], *, progress, cancel, workdir: Path) -> dict[str, Any]:
    """Rank a screen with ``es_merging.screen.screen`` into ``workdir/results.csv``."""
    from es_merging.screen import screen
    from server.app import load_from_spec

    progress("load model", 0, 1)
    model = load_from_spec(params["model_spec"])
    progress("load model", 1, 1)
    s = params["screen"]
    out = workdir / "results.csv"
    result = screen(model, s["task"], out=out, smiles=s.get("smiles"), proteins=s.get("proteins"),
                    cells=s.get("cells"), triples=s.get("triples"), option=s.get("rank_by"),
                    limit=int(s["max_rows"]), progress=progress, show=10)
    summary = result.model_dump(exclude={"out", "top"})
    summary["invalid"] = summary["invalid"][:50]
    return {"staged": str(out), "summary": summary}


def zoo_work(params: dict[str, Any], *, progress, cancel, workdir: Path) -> dict[str, Any]:
    """Build the embedded zoo into ``workdir/zoo``."""
    from es_merging.zoo.build import build_zoo

    out = workdir / "zoo"
    build_zoo(out, preset=params.get("preset", "tiny"), seed=int(params.get("seed", 0)), progress=progress)
    return {"staged": str(out)}
