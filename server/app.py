"""The MCP application: ``create_server(settings)`` builds an ``MCPServer`` whose lifespan opens the
store, the job runner and the model registry (reference-counted, so several in-process clients or the
HTTP transport share one state), registers the tools, resources and prompts, and bootstraps the
embedded zoo on first start."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from es_merging import __version__
from es_merging.errors import ExpertError, InvalidInputError
from server import security
from server.jobs import JobRunner
from server.settings import Settings
from server.store import Store

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
es-merging: merge biological multimodal LLM experts (molecule, protein, cell) with ES-Merging and
predict drug-protein-cell interactive effects.
Typical flow: inspect_* to validate inputs -> build_probe -> list_experts -> start_merge (returns a
job id at once) -> get_job (pass wait_s to wait with progress) -> describe_model -> predict_interaction
or start_screen. Paths must lie inside the server's allowed roots. Resources: esm://models/{id}/card,
/report, /heatmap.png; esm://probes/{id}; esm://screens/{job_id}/results.csv."""


class ModelRegistry:
    """Loaded models, least recently used first out (loading a model costs seconds)."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._use_locks: dict[str, threading.Lock] = {}

    def get(self, model_id: str, path: Path, loader: Any) -> Any:
        with self._lock:
            if model_id in self._models:
                self._models.move_to_end(model_id)
                return self._models[model_id]
            slot = self._loading.setdefault(model_id, threading.Lock())
        with slot:  # one load per model even when asked concurrently
            with self._lock:
                if model_id in self._models:
                    return self._models[model_id]
            model = loader(path)
            with self._lock:
                self._models[model_id] = model
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
                self._loading.pop(model_id, None)
            return model

    def lock_for(self, model_id: str) -> threading.Lock:
        """Serialises calls into one loaded model (its caches are not thread-safe)."""
        with self._lock:
            return self._use_locks.setdefault(model_id, threading.Lock())

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._models.pop(model_id, None)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


class AppState:
    """What every tool needs: settings, the store, the job runner, loaded models."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store: Store | None = None
        self.runner: JobRunner | None = None
        self.models = ModelRegistry()
        self._refs = 0
        self._lock = threading.Lock()
        self.bootstrap_job: str | None = None
        self.bootstrap_note: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        with self._lock:
            self._refs += 1
            if self._refs > 1:
                return
            s = self.settings
            for d in (s.data_home, s.probes_dir, s.models_dir, s.jobs_dir, s.data_home / "screens"):
                d.mkdir(parents=True, exist_ok=True)
            self.store = Store(s.store_path)
            self.runner = JobRunner(self.store, max_jobs=s.max_jobs, worker_threads=s.worker_threads,
                                    jobs_dir=s.jobs_dir)
            self.runner.context["state"] = self
            log.info("es-merging server %s: data home %s", __version__, s.data_home)
        if self.settings.bootstrap:
            from server.bootstrap import bootstrap

            try:
                bootstrap(self)
            except Exception:  # never refuse to serve because the zoo is unavailable
                log.exception("bootstrap of the embedded zoo failed; the server runs without it")

    def close(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0:
                return
            self._refs = 0
            if self.runner is not None:
                self.runner.close()
            if self.store is not None:
                self.store.close()
            self.models.clear()
            self.store = self.runner = None

    def require_open(self) -> None:
        if self.store is None or self.runner is None:
            raise ToolError("the server is not running (its state is closed); reconnect")

    # ------------------------------------------------------------------ helpers for tools
    def check_sizes(self, args: Any) -> None:
        security.check_sizes(args, max_list=self.settings.max_list, max_string=self.settings.max_string)

    def input_path(self, path: str, what: str = "path", *, kind: str | None = None) -> Path:
        return security.resolve_allowed(path, self.settings.allowed_roots, what=what, must_exist=True, kind=kind)

    def output_path(self, path: str, what: str = "output path") -> Path:
        return security.resolve_allowed(path, self.settings.output_roots, what=what)

    def expert_row(self, ref: str) -> dict[str, Any]:
        """An expert by registry id, or by a path inside the allowed roots (registered on the fly
        is NOT done here: use register_expert)."""
        assert self.store is not None
        row = self.store.get_expert(ref) if security.ID_PATTERN.match(ref) else None
        if row is not None:
            return row
        if "/" in ref or ref.startswith("."):
            resolved = self.input_path(ref, "expert", kind="dir")
            row = self.store.find_expert_by_path(str(resolved))
            if row is not None:
                return row
            raise ExpertError(f"expert directory {ref!r} is not registered; call register_expert with its path first")
        known = [e["id"] for e in self.store.list_experts()]
        raise InvalidInputError(ref, "no such expert", f"registered experts: {known}" if known else "no expert is registered yet; use register_expert")

    def model_row(self, model_id: str) -> dict[str, Any]:
        assert self.store is not None
        row = self.store.get_model(model_id) if security.ID_PATTERN.match(model_id) else None
        if row is None:
            rows, total = self.store.list_models(limit=20)
            known = [r["id"] for r in rows]
            raise InvalidInputError(model_id, "no such model", f"call list_models; e.g. {known}" if known else "no model is registered yet")
        return row

    def load_model(self, model_id: str) -> tuple[dict[str, Any], Any]:
        """A registered model, loaded once and cached (merged models via ``es_merging.load_model``,
        the zoo's base and experts via ``es_merging.predict.load_zoo_model``)."""
        row = self.model_row(model_id)
        path = Path(row["path"])
        if not path.is_dir():
            raise ExpertError(f"model {model_id!r}: its directory {path} no longer exists")
        from tools import import_backend

        spec = model_spec(row)
        if spec["kind"] == "zoo":
            predict = import_backend("loading a model", "es_merging.predict")
            return row, self.models.get(model_id, path, lambda _p: predict.load_zoo_model(spec["zoo_dir"], spec["expert"]))
        artifact = import_backend("loading a model", "es_merging.artifact")
        return row, self.models.get(model_id, path, artifact.load_model)


def model_spec(row: dict[str, Any]) -> dict[str, Any]:
    """How to load a registered model, as plain data (the screening worker process loads it too)."""
    path = Path(row["path"])
    if row["kind"] in ("base", "expert") and (path.parent / "zoo.json").is_file():
        return {"kind": "zoo", "zoo_dir": str(path.parent), "expert": "base" if row["kind"] == "base" else path.name}
    return {"kind": "merged", "path": str(path)}


def load_from_spec(spec: dict[str, Any]) -> Any:
    if spec["kind"] == "zoo":
        from es_merging.predict import load_zoo_model

        return load_zoo_model(spec["zoo_dir"], spec["expert"])
    from es_merging.artifact import load_model

    return load_model(spec["path"])


def create_server(settings: Settings | None = None) -> MCPServer:
    """Build the MCP server (nothing is opened until a client connects: the lifespan does it)."""
    settings = settings or Settings.from_env()
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[AppState]:
        await anyio.to_thread.run_sync(state.open)
        try:
            yield state
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(state.close)

    server = MCPServer(
        name="es-merging",
        title="ES-Merging for biological multimodal LLMs",
        instructions=INSTRUCTIONS,
        version=__version__,
        lifespan=lifespan,
        log_level=settings.log_level,
    )
    server.state = state  # type: ignore[attr-defined]  (tests and the HTTP wrapper reach it here)

    from prompts import register_all as register_prompts
    from server.resources import register as register_resources
    from tools import register_all as register_tools

    register_tools(server, state)
    register_resources(server, state)
    register_prompts(server, state)
    return server
