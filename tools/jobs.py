"""Long work as jobs: start_merge, start_screen (return a job id at once), get_job, cancel_job."""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from es_merging.errors import ExpertError, InvalidInputError, MergeError
from server.jobs import JOB_KINDS, register_job_kind
from server.security import check_id
from tools import Linked, add_tool, import_backend, link

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer
    from mcp.server.mcpserver import Context
    from mcp.types import ResourceLink

    from server.app import AppState
    from server.jobs import JobRunner

TOP_ROWS = 10
MAX_WAIT_S = 60.0


# ============================================================================ views


class ResourceRef(BaseModel):
    uri: str
    name: str
    mime_type: str


class JobView(Linked):
    job_id: str
    kind: str
    name: str | None
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    stage: str | None
    done: float
    total: float
    fraction: float | None = Field(description="progress of the current stage, 0-1")
    eta_s: float | None = Field(description="seconds left in the current stage (estimate)")
    elapsed_s: float | None
    created_at: str
    error: str | None
    result: dict[str, Any] | None
    resources: list[ResourceRef] = []
    next: str = Field(description="what to do next")

    def resource_links(self) -> list["ResourceLink"]:
        return [link(r.uri, r.name, f"result of job {self.job_id}", r.mime_type) for r in self.resources]


class JobHandle(BaseModel):
    """What start_merge, start_screen and cancel_job return (get_job has the full view)."""

    job_id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
    stage: str | None
    error: str | None
    next: str


def job_handle(row: dict[str, Any]) -> JobHandle:
    view = job_view(row)
    return JobHandle(job_id=view.job_id, kind=view.kind, state=view.state, stage=view.stage, error=view.error,
                     next=view.next)


def _iso(ts: float | None) -> str | None:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds") if ts else None


def job_view(row: dict[str, Any]) -> JobView:
    state = row["state"]
    total, done = row.get("total") or 0.0, row.get("done") or 0.0
    start, end = row.get("started_at"), row.get("finished_at")
    elapsed = round((end or time.time()) - start, 1) if start else None
    result = row.get("result")
    resources = [ResourceRef(**r) for r in (result or {}).get("resources", [])]
    public = {k: v for k, v in (result or {}).items() if k not in ("resources", "staged")} if result else None
    hints = {
        "queued": "waiting for a free worker; poll get_job(job_id, wait_s=30)",
        "running": "poll get_job(job_id, wait_s=30) (progress notifications while waiting), or cancel_job",
        "succeeded": "read the result and resources",
        "failed": "read error, fix the inputs and start a new job",
        "cancelled": "start a new job if needed",
        "interrupted": "the server restarted while it ran; start it again",
    }
    if state == "succeeded" and result and result.get("model_id"):
        hints["succeeded"] = f"describe_model('{result['model_id']}') or predict_interaction with model='{result['model_id']}'"
    return JobView(
        job_id=row["id"], kind=row["kind"], name=row.get("name"), state=state, stage=row.get("stage"),
        done=done, total=total, fraction=round(min(1.0, done / total), 4) if total else None,
        eta_s=row.get("eta_s"), elapsed_s=elapsed, created_at=_iso(row["created_at"]) or "",
        error=row.get("error"), result=public, resources=resources, next=hints[state],
    )


# ============================================================================ merge


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:64] or "model"


class StartMergeInput(BaseModel):
    """The fields of es_merging.options.MergeOptions, with registry ids accepted for paths."""

    model_config = ConfigDict(extra="forbid")
    experts: list[str] = Field(min_length=2, max_length=16, description="expert ids or directories")
    base: str | None = Field(None, description="base model id or directory (default: the experts' base)")
    method: str = Field("es", description="es, es_layer, es_element, average, task_arithmetic, ties, dare_linear, dare_ties")
    mode: Literal["factor", "delta"] | None = Field(None, description="factor: LoRA A, B apart (published); delta: dW")
    params: dict[str, float | int | str | bool] = Field(default_factory=dict, description="method parameters")
    probe: str | None = Field(None, description="probe id or JSON path; needed by es*")
    name: str | None = Field(None, description="id of the new model")
    out: str | None = Field(None, description="output directory (default DATA_HOME/models/<name>)")
    overwrite: bool = False
    seed: int = Field(0, ge=0)
    rank: int | None = Field(None, ge=1, le=4096, description="delta mode: SVD to this rank")
    shard_size_mb: int = Field(512, ge=1, le=65536)
    batch_size: int = Field(8, ge=1, le=1024)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    bundle_base: bool | None = Field(None, description="LoRA outputs: copy the base into the model (None: under 2 GB)")


def _resolve_base(state: "AppState", ref: str | None, expert_rows: list[dict[str, Any]]) -> Path:
    assert state.store is not None
    if ref is not None:
        row = state.store.get_model(ref) if re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", ref) else None
        if row is not None:
            return Path(row["path"])
        return state.input_path(ref, "base", kind="dir")
    hashes = {r["base_hash"] for r in expert_rows if r["base_hash"]}
    if len(hashes) > 1:
        raise ExpertError(f"the experts were trained on different bases ({sorted(h[:23] for h in hashes)}); "
                          "merge experts that share one base")
    rows, _ = state.store.list_models(kind="base", limit=1000)
    for row in rows:
        if hashes and row["meta"].get("base_hash") in hashes:
            return Path(row["path"])
    if not hashes and len(rows) == 1:
        return Path(rows[0]["path"])
    raise ExpertError("cannot tell which base the experts share; pass base (a model id or a directory)")


def start_merge(state: "AppState", inp: StartMergeInput) -> JobHandle:
    assert state.store is not None and state.runner is not None
    from es_merging.experts import load_expert_spec
    from es_merging.options import MergeOptions

    methods = import_backend("start_merge", "es_merging.methods")
    method = methods.get_method(inp.method, **inp.params)  # validates name and parameters now
    rows = [state.expert_row(ref) for ref in inp.experts]
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise InvalidInputError(inp.experts, "the same expert is listed twice")
    for r in rows:
        load_expert_spec(r["path"])  # files still there and well-formed
    base = _resolve_base(state, inp.base, rows)
    probe_path = None
    if inp.probe is not None:
        prow = state.store.get_probe(inp.probe)
        probe_path = Path(prow["path"]) if prow else state.input_path(inp.probe, "probe", kind="file")
    elif getattr(method, "needs_probe", False):
        raise MergeError(f"method {inp.method!r} reads embedding-space signals from a probe: pass probe "
                         "(build one with build_probe, e.g. from_zoo=true)")
    if inp.name is not None:
        check_id(inp.name, "model name")
        if state.store.id_taken("models", inp.name) and not inp.overwrite:
            raise InvalidInputError(inp.name, "a model with this id exists", "choose another name or pass overwrite=true")
    model_id = inp.name or state.store.unique_id("models", _slug(f"merged-{inp.method}"))
    final = state.output_path(inp.out, "out") if inp.out else state.settings.models_dir / model_id
    if final.exists() and not inp.overwrite:
        raise InvalidInputError(str(final), "output directory exists", "choose another name/out or pass overwrite=true")
    for job in state.store.list_jobs(limit=1000, state="running")[0] + state.store.list_jobs(limit=1000, state="queued")[0]:
        if job["kind"] == "merge" and job["params"].get("final_out") == str(final):
            raise InvalidInputError(str(final), f"job {job['id']} is already writing this output", "choose another name/out")
    options = MergeOptions(
        base=base, experts=[Path(r["path"]) for r in rows], method=inp.method, mode=inp.mode, params=inp.params,
        probe=probe_path, out=final, overwrite=inp.overwrite, seed=inp.seed, rank=inp.rank,
        shard_size_mb=inp.shard_size_mb, batch_size=inp.batch_size, device=inp.device, bundle_base=inp.bundle_base,
    )
    import_backend("start_merge", "es_merging.merge_api")  # after the argument checks: they teach more
    final.parent.mkdir(parents=True, exist_ok=True)
    params = {"options": json.loads(options.model_dump_json()), "final_out": str(final), "model_id": model_id,
              "overwrite": inp.overwrite, "experts": ids, "method": inp.method}
    row = state.runner.submit("merge", params, name=model_id, staging_parent=final.parent)
    return job_handle(state.runner.get(row["id"]))  # type: ignore[arg-type]


def model_resources(model_id: str) -> list[dict[str, str]]:
    return [
        {"uri": f"esm://models/{model_id}/card", "name": f"{model_id} model card", "mime_type": "text/markdown"},
        {"uri": f"esm://models/{model_id}/report", "name": f"{model_id} merge report", "mime_type": "application/json"},
        {"uri": f"esm://models/{model_id}/heatmap.png", "name": f"{model_id} coefficient heatmap", "mime_type": "image/png"},
    ]


def _staged(row: dict[str, Any], result: dict[str, Any]) -> Path:
    staged = Path(result["staged"]).resolve()
    staging = Path(row["staging_dir"]).resolve()
    if not staged.is_relative_to(staging) or not staged.exists():
        raise MergeError(f"the job's output {staged} is missing or outside its staging directory")
    return staged


def _merge_done(runner: "JobRunner", row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """In the server: move the finished model into place (one rename) and register it."""
    state: AppState = runner.context["state"]
    assert state.store is not None
    params = row["params"]
    staged = _staged(row, result)
    final = Path(params["final_out"])
    if final.exists():
        if not params.get("overwrite"):
            raise MergeError(f"{final} appeared while the merge ran; the new model was discarded")
        trash = Path(row["staging_dir"]) / "replaced"
        os.replace(final, trash)
    os.replace(staged, final)
    existing = [m for m in state.store.list_models(limit=100_000)[0] if m["path"] == str(final)]
    model_id = existing[0]["id"] if existing else state.store.unique_id("models", params["model_id"])
    state.models.forget(model_id)
    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((final / "es_merging.json").read_text())
    except (OSError, ValueError):
        pass
    meta = {"method": params.get("method"), "experts": params.get("experts"), "mode": manifest.get("mode"),
            "base_hash": (manifest.get("base") or {}).get("hash")}
    state.store.add_model(model_id, name=model_id, path=str(final), kind="merged", job_id=row["id"], meta=meta,
                          replace=bool(existing))
    return {"model_id": model_id, "path": str(final), "resources": model_resources(model_id)}


# ============================================================================ screen


class Triple(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: str | None = None
    protein: str | None = None
    cell: list[str] | str | None = None


class StartScreenInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model id")
    task: str = "triple_effect"
    smiles: list[str] | None = Field(None, description="compounds, crossed with proteins x cells")
    proteins: list[str] | None = None
    cells: list[list[str] | str] | None = Field(None, description="ranked genes per cell")
    triples: list[Triple] | None = Field(None, description="instead of the product")
    rank_by: str | None = Field(None, description="option to rank by (default the positive one)")
    max_rows: int = Field(10_000, ge=1)
    name: str | None = None

    @model_validator(mode="after")
    def _source(self) -> "StartScreenInput":
        product = any(x is not None for x in (self.smiles, self.proteins, self.cells))
        if product == (self.triples is not None):
            raise ValueError("give either lists (smiles/proteins/cells, crossed) or triples, not both or neither")
        return self


def start_screen(state: "AppState", inp: StartScreenInput) -> JobHandle:
    assert state.store is not None and state.runner is not None
    predict = import_backend("start_screen", "es_merging.predict")
    import_backend("start_screen", "es_merging.screen")
    from server.app import model_spec

    model = state.model_row(inp.model)
    limit = min(inp.max_rows, state.settings.max_screen_rows)
    if inp.triples is not None:
        n_rows = len(inp.triples)
    else:
        n_rows = 1
        for lst in (inp.smiles, inp.proteins, inp.cells):
            if lst is not None:
                n_rows *= len(lst)
    if n_rows == 0:
        raise InvalidInputError("[]", "the screen is empty", "give non-empty lists")
    if n_rows > limit:
        raise InvalidInputError(f"<{n_rows} rows>", f"the screen has {n_rows} rows; the limit is {limit}",
                                "shorten the lists, raise max_rows (server limit "
                                f"{state.settings.max_screen_rows}) or split the screen")
    task = predict.get_task(inp.task)  # unknown task: an error naming the built-in ones
    if inp.rank_by is not None and inp.rank_by not in task.options:
        raise InvalidInputError(inp.rank_by, f"not an answer option of task {task.name!r}", f"choose one of {list(task.options)}")
    if inp.triples is None:
        used = set(task.modalities) | set(task.optional_modalities)
        given = {"molecule": inp.smiles, "protein": inp.proteins, "cell": inp.cells}
        missing = [m for m in task.modalities if not given[m]]
        extra = [m for m, v in given.items() if v and m not in used]
        if missing or extra:
            raise InvalidInputError(inp.task, f"task needs {list(task.modalities)} (optional {list(task.optional_modalities)})",
                                    f"missing {missing}" if missing else f"drop {extra}")
    if inp.name is not None:
        check_id(inp.name, "screen name")
    screen = {
        "task": inp.task, "rank_by": inp.rank_by, "max_rows": limit,
        "smiles": inp.smiles, "proteins": inp.proteins, "cells": inp.cells,
        "triples": [t.model_dump() for t in inp.triples] if inp.triples is not None else None,
    }
    out_parent = state.settings.data_home / "screens"
    row = state.runner.submit("screen", {"screen": screen, "model": model["id"], "model_spec": model_spec(model),
                                         "rows": n_rows},
                              name=inp.name, staging_parent=out_parent)
    return job_handle(state.runner.get(row["id"]))  # type: ignore[arg-type]


def screen_csv_path(state: "AppState", job_id: str) -> Path:
    return state.settings.data_home / "screens" / job_id / "results.csv"


def _screen_done(runner: "JobRunner", row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    state: AppState = runner.context["state"]
    staged = _staged(row, result)
    final = screen_csv_path(state, row["id"])
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)
    top: list[dict[str, str]] = []
    n = 0
    with final.open(newline="") as fh:
        for rec in csv.DictReader(fh):
            if n < TOP_ROWS:
                top.append({k: (v[:60] + "...") if isinstance(v, str) and len(v) > 63 else v for k, v in rec.items()})
            n += 1
    uri = f"esm://screens/{row['id']}/results.csv"
    summary = result.get("summary", {})
    return {"rows": n, "top": top, "uri": uri, "model": row["params"].get("model"), "task": summary.get("task"),
            "ranked_by": summary.get("option"), "invalid": summary.get("invalid", [])[:20],
            "failed": summary.get("failed", 0), "seconds": summary.get("seconds"),
            "resources": [{"uri": uri, "name": f"screen {row['id'][:8]} results", "mime_type": "text/csv"}]}


# ============================================================================ get / cancel


class GetJobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str | None = Field(None, description="omit to list jobs")
    wait_s: float = Field(0, ge=0, le=MAX_WAIT_S)
    limit: int = Field(20, ge=1, le=200)
    offset: int = Field(0, ge=0)


class GetJobOutput(Linked):
    jobs: list[JobView]
    total: int
    next_offset: int | None = None

    def resource_links(self) -> list["ResourceLink"]:
        return self.jobs[0].resource_links() if len(self.jobs) == 1 else []


def _job_or_error(state: "AppState", job_id: str) -> dict[str, Any]:
    assert state.runner is not None
    row = state.runner.get(job_id) if len(job_id) <= 64 else None
    if row is None:
        raise InvalidInputError(job_id, "no such job", "call get_job without job_id to list jobs")
    return row


async def get_job(state: "AppState", inp: GetJobInput, ctx: "Context | None" = None) -> GetJobOutput:
    assert state.store is not None and state.runner is not None
    if inp.job_id is None:
        rows, total = state.store.list_jobs(limit=inp.limit, offset=inp.offset)
        views = [job_view(state.runner.get(r["id"]) or r) for r in rows]
        nxt = inp.offset + len(rows) if inp.offset + len(rows) < total else None
        return GetJobOutput(jobs=views, total=total, next_offset=nxt)
    row = _job_or_error(state, inp.job_id)
    deadline = time.monotonic() + inp.wait_s
    last: tuple | None = None
    while row["state"] in ("queued", "running") and time.monotonic() < deadline:
        key = (row["state"], row.get("stage"), row.get("done"), row.get("total"))
        if ctx is not None and key != last:
            last = key
            frac = (row["done"] / row["total"]) if row.get("total") else 0.0
            eta = f", ~{row['eta_s']:.0f}s left in stage" if row.get("eta_s") else ""
            msg = f"{row['state']}: {row.get('stage') or 'waiting'} {row['done']:g}/{row['total']:g}{eta}"
            try:
                await ctx.report_progress(row.get("stage_index", 0) + min(frac, 0.999), None, msg)
            except Exception:  # progress is best effort (no token, closed stream)
                pass
        await anyio.sleep(0.2)
        row = _job_or_error(state, inp.job_id)
    return GetJobOutput(jobs=[job_view(row)], total=1)


class CancelJobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str


def cancel_job(state: "AppState", inp: CancelJobInput) -> JobHandle:
    assert state.runner is not None
    _job_or_error(state, inp.job_id)
    if inp.job_id == state.bootstrap_job:
        state.bootstrap_note = "building the embedded zoo was cancelled; restart the server to build it again"
    row = state.runner.cancel(inp.job_id)
    return job_handle(row)  # type: ignore[arg-type]


# ============================================================================ registration


def _register_kinds() -> None:
    for name, target, hook in (("merge", "server.jobs:merge_work", _merge_done),
                               ("screen", "server.jobs:screen_work", _screen_done)):
        if name not in JOB_KINDS:
            register_job_kind(name, target, on_success=hook)


def register(server: "MCPServer", state: "AppState") -> None:
    _register_kinds()
    add_tool(
        server, state, start_merge, name="start_merge", title="Start a merge job",
        input_model=StartMergeInput, output_model=JobHandle, read_only=False, idempotent=False,
        description=(
            "Merge 2-16 experts sharing a base into a new model in the background; returns a job at once "
            "(follow with get_job). Method es (ES-Merging: layer- and element-wise coefficients from "
            "embedding-space signals; needs a probe) or a baseline. Arguments are checked before the job starts. "
            "The model is registered as `name` with a card, report and heatmap. Minutes on CPU."),
    )
    add_tool(
        server, state, get_job, name="get_job", title="Get job status",
        input_model=GetJobInput, output_model=GetJobOutput, read_only=True, idempotent=True, blocking=False,
        description=(
            "State, stage, progress, ETA, error and result links of a job; without job_id, recent jobs "
            "(paginated). wait_s waits for the end, sending progress notifications. interrupted = the server "
            "restarted mid-job."),
    )
    add_tool(
        server, state, cancel_job, name="cancel_job", title="Cancel a job",
        input_model=CancelJobInput, output_model=JobHandle, read_only=False, idempotent=True, destructive=True,
        description=(
            "Stop a queued or running job: its worker process is terminated and its partial output deleted. "
            "A finished job is returned unchanged."),
    )
    add_tool(
        server, state, start_screen, name="start_screen", title="Start a screening job",
        input_model=StartScreenInput, output_model=JobHandle, read_only=False, idempotent=False,
        description=(
            "Score compounds x targets x cells (or explicit triples) with a model in the background, ranked by "
            "one option's probability. Returns a job; results: esm://screens/{job_id}/results.csv, top rows in "
            "get_job. For a few items use predict_interaction."),
    )
