"""MCP resources: model cards, merge reports, coefficient heatmaps (PNG), probe summaries and
screen results (CSV, paginated by rows). URIs name registry ids, never file paths: the file is
looked up in the store, so a resource can never reach outside what the registry holds."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError

from server.security import ID_PATTERN

if TYPE_CHECKING:  # pragma: no cover
    from mcp.server import MCPServer

    from server.app import AppState

PROBE_SAMPLES_SHOWN = 20
CSV_PAGE_DEFAULT = 1000
CSV_PAGE_MAX = 20_000


def register(server: "MCPServer", state: "AppState") -> None:
    def model_file(model_id: str, filename: str) -> Path:
        if state.store is None:
            raise ResourceError("the server state is closed")
        row = state.store.get_model(model_id) if ID_PATTERN.match(model_id) else None
        if row is None:
            raise ResourceNotFoundError(f"no model {model_id!r}; call list_models")
        path = Path(row["path"]) / filename
        if not path.is_file():
            raise ResourceNotFoundError(f"model {model_id!r} has no {filename} (only merged models carry one)")
        return path

    @server.resource("esm://models/{model_id}/card", name="model_card", title="Model card",
                     description="README.md of a merged model: what it merges, how, and how well.",
                     mime_type="text/markdown")
    def model_card(model_id: str) -> str:
        return model_file(model_id, "README.md").read_text()

    @server.resource("esm://models/{model_id}/report", name="merge_report", title="Merge report",
                     description="report.json of a merged model: coefficients, signals, timings.",
                     mime_type="application/json")
    def merge_report(model_id: str) -> str:
        return model_file(model_id, "report.json").read_text()

    @server.resource("esm://models/{model_id}/heatmap.png", name="coefficient_heatmap", title="Coefficient heatmap",
                     description="PNG heatmap of the layer-wise coefficients (experts x layers).",
                     mime_type="image/png")
    def heatmap(model_id: str) -> bytes:
        return model_file(model_id, "layer_coefficients.png").read_bytes()

    @server.resource("esm://probes/{probe_id}", name="probe_summary", title="Probe summary",
                     description=f"A probe's summary (size, modalities, hash, skipped items) and its first {PROBE_SAMPLES_SHOWN} samples.",
                     mime_type="application/json")
    def probe_summary(probe_id: str) -> str:
        if state.store is None:
            raise ResourceError("the server state is closed")
        row = state.store.get_probe(probe_id) if ID_PATTERN.match(probe_id) else None
        if row is None:
            raise ResourceNotFoundError(f"no probe {probe_id!r}; build one with build_probe")
        try:
            data = json.loads(Path(row["path"]).read_text())
        except (OSError, ValueError):
            raise ResourceNotFoundError(f"probe {probe_id!r}: its file {row['path']} is missing or unreadable") from None
        samples = data.get("samples", [])
        shown: list[dict[str, Any]] = []
        for s in samples[:PROBE_SAMPLES_SHOWN]:
            s = dict(s)
            if isinstance(s.get("protein"), str) and len(s["protein"]) > 80:
                s["protein"] = s["protein"][:77] + "..."
            shown.append({k: v for k, v in s.items() if v not in (None, {}, [])})
        return json.dumps({"id": probe_id, "summary": row["summary"], "samples_shown": shown,
                           "skipped": data.get("meta", {}).get("skipped", [])[:50]}, indent=1)

    @server.resource("esm://screens/{job_id}/results.csv{?offset,limit}", name="screen_results",
                     title="Screen results",
                     description=(f"Ranked screening results as CSV (header + rows). Paginated: ?offset=0&limit="
                                  f"{CSV_PAGE_DEFAULT} (max {CSV_PAGE_MAX})."),
                     mime_type="text/csv")
    def screen_results(job_id: str, offset: int = 0, limit: int = CSV_PAGE_DEFAULT) -> str:
        if state.store is None:
            raise ResourceError("the server state is closed")
        job = state.store.get_job(job_id) if len(job_id) <= 64 else None
        if job is None or job["kind"] != "screen":
            raise ResourceNotFoundError(f"no screening job {job_id!r}")
        if job["state"] != "succeeded":
            raise ResourceNotFoundError(f"screening job {job_id!r} is {job['state']}; results appear when it succeeds")
        path = state.settings.data_home / "screens" / job_id / "results.csv"
        if not path.is_file():
            raise ResourceNotFoundError(f"screening job {job_id!r}: results file is missing")
        offset, limit = max(0, int(offset)), max(1, min(CSV_PAGE_MAX, int(limit)))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        with path.open(newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is not None:
                writer.writerow(header)
            for i, rec in enumerate(reader):
                if i < offset:
                    continue
                if i >= offset + limit:
                    break
                writer.writerow(rec)
        return out.getvalue()
