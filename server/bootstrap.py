"""First start: register the embedded zoo (base + molecule/protein/cell experts).

If the zoo directory has no ``zoo.json`` yet it is built with ``es_merging.zoo`` (preset from the
settings, ``tiny`` by default) as a background job, so the server answers at once; progress goes to
stderr and ``list_experts`` shows it. ``--no-bootstrap`` / ``ES_MERGING_BOOTSTRAP=0`` skips all of
this (tests point ``ES_MERGING_ZOO_DIR`` at a prebuilt test-preset zoo and call
:func:`register_zoo` themselves, or let bootstrap find it)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from es_merging.errors import EsMergingError
from server.jobs import JOB_KINDS, register_job_kind

if TYPE_CHECKING:  # pragma: no cover
    from server.app import AppState
    from server.jobs import JobRunner

log = logging.getLogger(__name__)

ZOO_MODALITIES = ("molecule", "protein", "cell")
BASE_MODEL_ID = "zoo-base"


def register_zoo(state: "AppState", zoo_dir: Path) -> list[str]:
    """Register a built zoo's base (as a model) and experts (as experts and as models). Idempotent."""
    from es_merging.experts import load_expert_spec
    from tools.experts import register_spec

    assert state.store is not None
    zoo_dir = Path(zoo_dir).resolve()
    try:
        report = json.loads((zoo_dir / "zoo.json").read_text())
    except (OSError, ValueError) as exc:
        raise EsMergingError(f"{zoo_dir}/zoo.json is missing or unreadable ({exc}); rebuild the zoo") from None
    registered = []
    base_meta = {"base_hash": report.get("base_hash"), "source": "zoo", "preset": (report.get("preset") or {}).get("name")}
    if state.store.get_model(BASE_MODEL_ID) is None:
        state.store.add_model(BASE_MODEL_ID, name=BASE_MODEL_ID, path=str(zoo_dir / "base"), kind="base", meta=base_meta)
        registered.append(BASE_MODEL_ID)
    experts = report.get("experts") or {m: {"path": m} for m in ZOO_MODALITIES}
    for name, info in experts.items():
        path = (zoo_dir / (info.get("path") or name)).resolve()
        ident = f"zoo-{name}"
        if state.store.find_expert_by_path(str(path)) is None and not state.store.id_taken("experts", ident):
            spec = load_expert_spec(path)
            register_spec(state, ident, spec, source="zoo")
            registered.append(ident)
        if state.store.get_model(ident) is None:
            state.store.add_model(ident, name=ident, path=str(path), kind="expert",
                                  meta={"modality": info.get("modality", name), "base_hash": report.get("base_hash"),
                                        "source": "zoo"})
    if registered:
        log.info("registered the embedded zoo from %s: %s", zoo_dir, ", ".join(registered))
    return registered


def _zoo_done(runner: "JobRunner", row: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    state: AppState = runner.context["state"]
    staged = Path(result["staged"]).resolve()
    if not staged.is_relative_to(Path(row["staging_dir"]).resolve()):
        raise EsMergingError("the zoo build wrote outside its staging directory")
    final = Path(row["params"]["final"])
    if final.exists():
        raise EsMergingError(f"{final} appeared while the zoo was being built; kept the existing one")
    os.replace(staged, final)
    registered = register_zoo(state, final)
    state.bootstrap_note = None
    return {"zoo_dir": str(final), "registered": registered}


def bootstrap(state: "AppState") -> None:
    assert state.store is not None and state.runner is not None
    if state.store.count_experts() > 0:
        return
    zoo_dir = state.settings.effective_zoo_dir
    if (zoo_dir / "zoo.json").exists():
        register_zoo(state, zoo_dir)
        return
    if "zoo_build" not in JOB_KINDS:
        register_job_kind("zoo_build", "server.jobs:zoo_work", on_success=_zoo_done,
                          description="build the embedded zoo")
    for job in state.store.list_jobs(limit=50, kind="zoo_build")[0]:
        if job["state"] in ("queued", "running"):
            state.bootstrap_job = job["id"]
            return
    if zoo_dir.exists() and any(zoo_dir.iterdir()):
        state.bootstrap_note = (f"{zoo_dir} exists but holds no zoo.json; remove it or point ES_MERGING_ZOO_DIR "
                                "at a built zoo, then restart")
        log.warning(state.bootstrap_note)
        return
    zoo_dir.parent.mkdir(parents=True, exist_ok=True)
    preset = state.settings.zoo_preset
    job = state.runner.submit("zoo_build", {"preset": preset, "seed": 0, "final": str(zoo_dir)},
                              name="embedded-zoo", staging_parent=zoo_dir.parent)
    state.bootstrap_job = job["id"]
    log.info("building the embedded zoo (preset %s) into %s as job %s; the server answers meanwhile",
             preset, zoo_dir, job["id"])
