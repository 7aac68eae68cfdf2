"""`make demo`: a scripted agent session against the MCP server over stdio.

The server runs as a subprocess (exactly what Claude Desktop / Claude Code would start); this
script plays the agent: it inspects real molecules, proteins and single cells from the shared
datasets, builds a probe, starts an ES merge of the embedded zoo's three experts, follows the job,
reads the coefficients, and asks the merged model for interactive-effect predictions. Each step
prints what the tool returned (abridged). The embedded zoo is built first if it is missing."""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _say(title: str, payload: Any = None) -> None:
    print(f"\n=== {title}", flush=True)
    if payload is not None:
        text = json.dumps(payload, indent=2, default=str)
        lines = text.splitlines()
        print("\n".join(lines[:40] + ([f"  ... ({len(lines) - 40} more lines)"] if len(lines) > 40 else [])))


def _real_inputs(data_dir: Path) -> dict[str, Any]:
    """A few real drugs and kinase targets (Davis) and the pbmc68k h5ad path, read from the data dir."""
    with (data_dir / "davis" / "davis_drugs.csv").open(newline="") as fh:
        drugs = list(csv.DictReader(fh))[:3]
    with (data_dir / "davis" / "davis_targets.csv").open(newline="") as fh:
        targets = list(csv.DictReader(fh))[:2]
    smiles_col = next(c for c in drugs[0] if "smiles" in c.lower())
    seq_col = next(c for c in targets[0] if "seq" in c.lower())
    return {
        "smiles": [d[smiles_col] for d in drugs],
        "sequences": [t[seq_col] for t in targets],
        "h5ad": str(data_dir / "singlecell" / "pbmc68k_reduced.h5ad"),
    }


def _structured(result) -> dict[str, Any]:
    if result.is_error:
        raise RuntimeError(" ".join(getattr(c, "text", "") for c in result.content))
    if result.structured_content is not None:
        return result.structured_content
    return json.loads(result.content[0].text)


async def _session(args: argparse.Namespace, zoo_dir: Path) -> None:
    from mcp import Client, StdioServerParameters

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "es_merging", "serve", "--transport", "stdio", "--data-home", str(args.data_home),
              "--zoo-dir", str(zoo_dir)] + (["--data-dir", str(args.data_dir)] if args.data_dir.exists() else []),
        env=env,
        cwd=str(REPO),
    )
    async with Client(params) as client:
        tools = await client.list_tools()
        _say(f"connected: {len(tools.tools)} tools", [t.name for t in tools.tools])

        async def call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
            return _structured(await client.call_tool(name, arguments))

        experts = await call("list_experts", {})
        _say("list_experts", experts)
        expert_ids = [e["id"] for e in experts["experts"]]

        if args.data_dir.exists():
            real = _real_inputs(args.data_dir)
            mols = await call("inspect_molecules", {"smiles": real["smiles"] + ["C1CC"]})
            _say("inspect_molecules (3 Davis drugs + an unclosed ring)", mols)
            prots = await call("inspect_proteins", {"sequences": real["sequences"][:1] + ["MKT1AYIAKQR"]})
            _say("inspect_proteins (a Davis kinase + a sequence with a digit)", prots)
            cells = await call("inspect_cell_profiles", {"h5ad_path": real["h5ad"], "limit": 2, "top_k": 10})
            _say("inspect_cell_profiles (pbmc68k, first 2 cells)", cells)
        else:
            _say(f"real datasets not found at {args.data_dir}: skipping the inspect steps")

        probe = await call("build_probe", {"from_zoo": True, "n": args.probe_size, "seed": args.seed})
        _say("build_probe (embedded world)", probe)

        handle = await call("start_merge", {"experts": expert_ids, "method": "es", "probe": probe["probe_id"],
                                            "name": args.model_name, "overwrite": True, "seed": args.seed})
        _say("start_merge (ES-Merging of the three experts)", handle)
        job_id = handle["job_id"]
        last = None
        t0 = time.time()
        while True:
            job = (await call("get_job", {"job_id": job_id, "wait_s": 1.0}))["jobs"][0]
            line = (job["state"], job["stage"], round(job.get("fraction") or 0, 2))
            if line != last:
                print(f"  [{time.time() - t0:6.1f}s] get_job: {job['state']:<9} {job['stage'] or ''} "
                      f"{(job.get('fraction') or 0):.0%}", flush=True)
                last = line
            if job["state"] not in ("queued", "running"):
                break
        _say("get_job (final)", job)
        if job["state"] != "succeeded":
            raise RuntimeError(f"merge job ended {job['state']}: {job.get('error')}")
        model_id = job["result"].get("model_id") or args.model_name

        described = await call("describe_model", {"model_id": model_id})
        _say("describe_model (layer coefficients lambda[expert][layer])", {
            k: described.get(k) for k in ("id", "method", "mode", "experts", "layer_coefficients", "timings_s")})

        from es_merging.zoo import zoo_world
        from es_merging.zoo.train import to_probe_sample

        held_out = zoo_world(zoo_dir).samples(4, "heldout", seed=args.seed + 5)
        items = [{"smiles": ws.molecule.raw, "protein": ws.protein.raw, "cell": list(ws.cell.raw)} for ws in held_out]
        pred = await call("predict_interaction", {"model": model_id, "task": "embedded", "items": items})
        truth = [{"descriptors": to_probe_sample(ws).descriptors, "answer": ws.answer} for ws in held_out]
        _say("predict_interaction (merged model, held-out embedded-world triples)",
             {"predictions": pred["predictions"], "truth": truth})
        if args.data_dir.exists():
            real_pred = await call("predict_interaction", {
                "model": model_id, "task": "triple_effect",
                "items": [{"smiles": real["smiles"][0], "protein": real["sequences"][0],
                           "cell": "CD3D, CD3E, IL7R, LCK, CD2"}]})
            _say("predict_interaction (a real drug/kinase/T-cell triple; the tiny zoo never saw real biology, "
                 "so read this as a plumbing check, not a prediction)", real_pred)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--data-home", type=Path, default=REPO / "runs" / "demo-home")
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo (default DATA_HOME/zoo, built if missing)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "test"])
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--model-name", default="demo-es")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir.resolve()
    args.data_home = args.data_home.resolve()
    zoo_dir = (args.zoo or args.data_home / "zoo").resolve()
    if not (zoo_dir / "zoo.json").exists():
        _say(f"building the embedded zoo ({args.preset} preset) into {zoo_dir}; progress on stderr")
        subprocess.run([sys.executable, "-m", "es_merging", "zoo", "build", "--preset", args.preset,
                        "--out", str(zoo_dir), "--seed", str(args.seed)], check=True)
    asyncio.run(_session(args, zoo_dir))
    print("\ndemo finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
