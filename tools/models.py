"""Models: list_models, describe_model, predict_interaction."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from es_merging.errors import EsMergingError, InvalidInputError
from tools import Linked, add_tool, import_backend, link
from tools.jobs import model_resources

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer
    from mcp.types import ResourceLink

    from server.app import AppState

MAX_PREDICT_ITEMS = 64


class ModelOut(BaseModel):
    id: str
    kind: str = Field(description="merged, base or expert")
    method: str | None = None
    experts: list[str] | None = None
    path: str
    created_at: float


class ListModelsInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["merged", "base", "expert"] | None = None
    limit: int = Field(50, ge=1, le=200)
    offset: int = Field(0, ge=0)


class ListModelsOutput(BaseModel):
    models: list[ModelOut]
    total: int
    next_offset: int | None = None


def list_models(state: "AppState", inp: ListModelsInput) -> ListModelsOutput:
    assert state.store is not None
    rows, total = state.store.list_models(kind=inp.kind, limit=inp.limit, offset=inp.offset)
    models = [ModelOut(id=r["id"], kind=r["kind"], method=r["meta"].get("method"), experts=r["meta"].get("experts"),
                       path=r["path"], created_at=r["created_at"]) for r in rows]
    nxt = inp.offset + len(rows) if inp.offset + len(rows) < total else None
    return ListModelsOutput(models=models, total=total, next_offset=nxt)


# ----------------------------------------------------------------------------- describe


class DescribeModelInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str


class ExpertWeight(BaseModel):
    name: str
    modality: str | None = None
    mean_layer_coefficient: float | None = Field(None, description="mean lambda over layers")
    layers_led: int | None = Field(None, description="layers where this expert has the largest lambda")


class DescribeModelOutput(Linked):
    id: str
    kind: str
    path: str
    method: str | None = None
    mode: str | None = None
    params: dict[str, Any] = {}
    experts: list[ExpertWeight] = []
    layer_coefficients: list[list[float]] | None = Field(None, description="lambda[expert][layer], rounded")
    probe_hash: str | None = None
    base_hash: str | None = None
    timings_s: dict[str, float] = {}
    files: list[str] = []
    resources: list[str] = []

    def resource_links(self) -> list["ResourceLink"]:
        mime = {"card": "text/markdown", "report": "application/json", "heatmap.png": "image/png"}
        return [link(u, u.rsplit("/", 1)[-1], f"{self.id} {u.rsplit('/', 1)[-1]}", mime.get(u.rsplit("/", 1)[-1], "application/octet-stream"))
                for u in self.resources]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _lambda(path: Path) -> list[list[float]] | None:
    file = path / "coefficients.safetensors"
    if not file.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(file), framework="np") as fh:
            for key in ("lam", "layer_lambda", "lambda"):
                if key in fh.keys():
                    return [[round(float(x), 4) for x in row] for row in fh.get_tensor(key).reshape(fh.get_tensor(key).shape[0], -1)]
    except Exception:  # an unreadable optional file: describe without it
        return None
    return None


def describe_model(state: "AppState", inp: DescribeModelInput) -> DescribeModelOutput:
    row = state.model_row(inp.model_id)
    path = Path(row["path"])
    if not path.is_dir():
        raise EsMergingError(f"model {inp.model_id!r}: its directory {path} no longer exists")
    manifest = _read_json(path / "es_merging.json")
    method = manifest.get("method")
    method_name = method.get("name") if isinstance(method, dict) else method
    params = (method.get("params") if isinstance(method, dict) else manifest.get("params")) or {}
    base = manifest.get("base")
    probe = manifest.get("probe")
    lam = _lambda(path)
    experts: list[ExpertWeight] = []
    for e, spec in enumerate(manifest.get("experts") or []):
        spec = spec if isinstance(spec, dict) else {"name": str(spec)}
        w = ExpertWeight(name=str(spec.get("name", f"expert{e}")), modality=spec.get("modality"))
        if lam is not None and e < len(lam) and lam[e]:
            w.mean_layer_coefficient = round(sum(lam[e]) / len(lam[e]), 4)
            w.layers_led = sum(1 for l in range(len(lam[e])) if max(range(len(lam)), key=lambda x: lam[x][l]) == e)
        experts.append(w)
    if row["kind"] == "expert" and not experts:
        spec = _read_json(path / "expert.json")
        experts = [ExpertWeight(name=spec.get("name", row["id"]), modality=spec.get("modality"))]
    timings = manifest.get("timings") or _read_json(path / "report.json").get("timings") or {}
    resources = [r["uri"] for r in model_resources(row["id"])] if row["kind"] == "merged" else []
    return DescribeModelOutput(
        id=row["id"], kind=row["kind"], path=str(path), method=method_name or row["meta"].get("method"),
        mode=manifest.get("mode"), params=params, experts=experts,
        layer_coefficients=lam if lam is not None and len(lam) * len(lam[0]) <= 2048 else None,
        probe_hash=probe.get("hash") if isinstance(probe, dict) else None,
        base_hash=(base.get("hash") if isinstance(base, dict) else None) or row["meta"].get("base_hash"),
        timings_s={k: float(v) for k, v in timings.items() if isinstance(v, (int, float))},
        files=sorted(p.name for p in path.iterdir())[:50], resources=resources,
    )


# ----------------------------------------------------------------------------- predict


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: str | None = None
    protein: str | None = None
    cell: list[str] | str | None = None


class PredictInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model id")
    task: str = Field("triple_effect", description="dti, drug_response, triple_effect or embedded")
    items: list[PredictItem] = Field(min_length=1, max_length=MAX_PREDICT_ITEMS)
    support: list[dict[str, Any]] | None = Field(None, description="labelled examples: smiles/protein/cell + answer")
    k: int = Field(0, ge=0, le=16, description="support examples per query, nearest first")


class Prediction(BaseModel):
    index: int
    ok: bool
    error: str | None = None
    choice: str | None = None
    probabilities: dict[str, float] | None = None
    slots: dict[str, str] | None = Field(None, description="descriptors the model stated first (tasks with slots)")


class PredictOutput(BaseModel):
    model: str
    task: str
    options: list[str]
    predictions: list[Prediction]


def predict_interaction(state: "AppState", inp: PredictInput) -> PredictOutput:
    predict = import_backend("predict_interaction", "es_merging.predict")
    task = predict.get_task(inp.task)  # unknown task: an error naming the built-in ones
    if inp.k and not inp.support:
        raise InvalidInputError(inp.k, "k > 0 needs support examples", "pass support or set k=0")
    row, model = state.load_model(inp.model)
    items = [i.model_dump(exclude_none=True) for i in inp.items]
    with state.models.lock_for(row["id"]):
        preds = predict.predict(model, items, task, support=inp.support, k=inp.k)
    out = [Prediction(index=p.index, ok=p.ok, error=p.error, choice=p.choice,
                      probabilities={k: round(v, 6) for k, v in p.probabilities.items()} if p.ok else None,
                      slots=p.slots or None) for p in preds]
    return PredictOutput(model=row["id"], task=task.name, options=list(task.options), predictions=out)


def register(server: "MCPServer", state: "AppState") -> None:
    add_tool(
        server, state, list_models, name="list_models", title="List models",
        input_model=ListModelsInput, output_model=ListModelsOutput, read_only=True, idempotent=True,
        description=(
            "Models to query with predict_interaction/start_screen: merged ones, the base and single experts. Paginated."),
    )
    add_tool(
        server, state, describe_model, name="describe_model", title="Describe a model",
        input_model=DescribeModelInput, output_model=DescribeModelOutput, read_only=True, idempotent=True,
        description=(
            "What a merged model is made of: method, mode, parameters, experts, layer coefficients "
            "lambda[expert][layer] (and layers each expert leads), hashes, timings, links to card/report/heatmap."),
    )
    add_tool(
        server, state, predict_interaction, name="predict_interaction", title="Predict interactions",
        input_model=PredictInput, output_model=PredictOutput, read_only=True, idempotent=True,
        description=(
            f"Ask a model about up to {MAX_PREDICT_ITEMS} (drug, protein, cell) items: each answer option is "
            "scored by log-likelihood -> a probability per option. Errors per item. Larger sets: start_screen."),
    )
