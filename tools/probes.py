"""build_probe: assemble the probe ES-Merging reads its embedding-space signals from."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from es_merging.errors import ProbeError
from server.security import check_id
from tools import Linked, add_tool, import_backend, link

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer
    from mcp.types import ResourceLink

    from server.app import AppState

MAX_SKIPPED_SHOWN = 50


class ProbeSampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: str | None = None
    protein: str | None = None
    cell: list[str] | str | None = Field(None, description="ranked genes, list or comma-separated")
    id: str | None = None


class BuildProbeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[ProbeSampleIn] | None = None
    table_path: str | None = Field(None, description="CSV/TSV, columns smiles, protein, cell")
    from_zoo: bool = Field(False, description="samples from the embedded zoo's world")
    n: int | None = Field(None, ge=1, le=100_000, description="samples kept (default all; 64 from_zoo)")
    strategy: Literal["random", "diverse"] = Field("random", description="diverse: MaxMin on drug fingerprints")
    seed: int = Field(0, ge=0)
    name: str | None = Field(None, description="probe id (default from its hash)")

    @model_validator(mode="after")
    def _one_source(self) -> "BuildProbeInput":
        given = sum([self.samples is not None, self.table_path is not None, self.from_zoo])
        if given != 1:
            raise ValueError("give exactly one source: samples, table_path or from_zoo=true")
        return self


class SkippedSample(BaseModel):
    index: int
    error: str


class BuildProbeOutput(Linked):
    probe_id: str
    uri: str
    n: int
    modalities: list[str]
    hash: str
    n_candidates: int
    skipped: list[SkippedSample] = Field(description=f"invalid samples left out (first {MAX_SKIPPED_SHOWN})")
    reused: bool = Field(description="an identical probe was already registered")

    def resource_links(self) -> list["ResourceLink"]:
        return [link(self.uri, f"probe {self.probe_id}", "probe summary and samples", "application/json")]


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:64]
    return slug or "probe"


def build_probe(state: "AppState", inp: BuildProbeInput) -> BuildProbeOutput:
    probe_mod = import_backend("build_probe", "es_merging.probe")
    assert state.store is not None
    if inp.name is not None:
        check_id(inp.name, "probe name")
    if inp.from_zoo:
        zoo = import_backend("build_probe from the zoo", "es_merging.zoo")
        zoo_dir = state.settings.effective_zoo_dir
        if not (zoo_dir / "zoo.json").exists():
            raise ProbeError(f"the embedded zoo is not built yet ({zoo_dir}); wait for the bootstrap job "
                             "(see list_experts) or give samples/table_path")
        probe = zoo.probe_from_zoo(zoo_dir, n=inp.n or 64, seed=inp.seed, strategy=inp.strategy)
        n_candidates = probe.meta["candidates"]
    else:
        if inp.table_path is not None:
            path = state.input_path(inp.table_path, "table_path", kind="file")
            raw: list[Any] = probe_mod.samples_from_table(path)
            source = f"table:{path.name}"
        else:
            raw = [s.model_dump(exclude_none=True) for s in inp.samples or []]
            for sample in raw:
                if isinstance(sample.get("cell"), str):
                    sample["cell"] = [g.strip() for g in sample["cell"].split(",") if g.strip()]
            source = "explicit"
        state.check_sizes(raw)
        n_candidates = len(raw)
        probe = probe_mod.build_probe(raw, n=inp.n, strategy=inp.strategy, seed=inp.seed, source=source,
                                      skip_invalid=True)
    digest = probe.content_hash
    for row in state.store.list_probes():
        if row["hash"] == digest and (inp.name is None or row["id"] == inp.name) and Path(row["path"]).exists():
            return _out(row["id"], probe, n_candidates, reused=True)
    probe_id = state.store.unique_id("probes", inp.name or f"probe-{digest.split(':')[-1][:10]}")
    path = state.settings.probes_dir / f"{probe_id}.json"
    probe.save(path)
    state.store.add_probe(probe_id, name=inp.name, path=str(path), hash=digest, summary=probe.summary())
    return _out(probe_id, probe, n_candidates, reused=False)


def _out(probe_id: str, probe: Any, n_candidates: int, *, reused: bool) -> BuildProbeOutput:
    skipped = [SkippedSample(index=s["index"], error=s["error"]) for s in probe.meta.get("skipped", [])]
    return BuildProbeOutput(
        probe_id=probe_id, uri=f"esm://probes/{probe_id}", n=len(probe.samples), modalities=probe.modalities(),
        hash=probe.content_hash, n_candidates=n_candidates, skipped=skipped[:MAX_SKIPPED_SHOWN], reused=reused,
    )


def register(server: "MCPServer", state: "AppState") -> None:
    add_tool(
        server, state, build_probe, name="build_probe", title="Build a merge probe",
        input_model=BuildProbeInput, output_model=BuildProbeOutput, read_only=False, idempotent=True,
        description=(
            "Build a probe: (drug, protein, cell) samples start_merge feeds to the base and experts to "
            "measure embedding-space signals (method es needs one). From samples, a CSV/TSV table or from_zoo. "
            "Invalid samples are skipped and listed. 32-128 samples covering every expert's modality are typical."),
    )
