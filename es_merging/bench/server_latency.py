"""How responsive the MCP server stays while a merge job runs.

``bench_server_latency`` starts the server (``es-merging serve`` over stdio by default, as an agent
would), registers a built zoo, starts an ES-Merging job of the zoo's three experts and, while the
job runs, calls ``get_job`` in a loop (and ``predict_interaction`` every few calls), recording each
call's wall-clock latency at the client. The merge runs in the server's worker process; the target
is a median ``get_job`` latency under 200 ms.

    es-merging bench server-latency --zoo DIR [--transport stdio|inproc] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from es_merging.bench import register

TARGET_MEDIAN_MS = 200.0


def _stats(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(samples), "median": round(statistics.median(ordered), 2),
            "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
            "max": round(ordered[-1], 2), "min": round(ordered[0], 2)}


async def _run(zoo: Path, home: Path, transport: str, method: str, probe_n: int, interval_s: float,
               predict_every: int, timeout_s: float) -> dict[str, Any]:
    from mcp import Client

    if transport == "stdio":
        from mcp import StdioServerParameters

        env = dict(os.environ, ES_MERGING_DATA_HOME=str(home), ES_MERGING_ZOO_DIR=str(zoo),
                   ES_MERGING_BOOTSTRAP="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        target: Any = StdioServerParameters(command=sys.executable, args=["-m", "es_merging", "serve"], env=env)
    else:
        from server.app import create_server
        from server.settings import Settings

        target = create_server(Settings(data_home=home, zoo_dir=zoo, bootstrap=True, include_cwd=False))

    async with Client(target, cache=None) as c:
        experts = (await c.call_tool("list_experts", {})).structured_content["experts"]
        ids = [e["id"] for e in experts if e["source"] == "zoo"]
        if len(ids) < 2:
            raise RuntimeError(f"the zoo at {zoo} did not register (experts: {experts})")
        probe = await c.call_tool("build_probe", {"from_zoo": True, "n": probe_n, "name": "bench-probe"})
        if probe.is_error:
            raise RuntimeError(probe.content[0].text)
        t_start = time.perf_counter()
        started = await c.call_tool("start_merge", {"experts": ids, "method": method, "probe": "bench-probe",
                                                    "name": "bench-merged"})
        if started.is_error:
            raise RuntimeError(started.content[0].text)
        job_id = started.structured_content["job_id"]
        get_ms: list[float] = []
        predict_ms: list[float] = []
        stages: list[str] = []
        state = "queued"
        item = {"smiles": "CC(=O)Oc1ccccc1C(=O)O", "protein": "MKTAYIAKQRQISFVKSHFSRQ", "cell": ["CD3E", "CD4"]}
        deadline = time.monotonic() + timeout_s
        i = 0
        while time.monotonic() < deadline:
            t = time.perf_counter()
            r = await c.call_tool("get_job", {"job_id": job_id})
            elapsed = (time.perf_counter() - t) * 1000
            view = r.structured_content["jobs"][0]
            state = view["state"]
            if state not in ("queued", "running"):
                break
            if state == "running":
                get_ms.append(elapsed)
                if view["stage"] and (not stages or stages[-1] != view["stage"]):
                    stages.append(view["stage"])
            i += 1
            if predict_every and i % predict_every == 0 and state == "running":
                t = time.perf_counter()
                p = await c.call_tool("predict_interaction", {"model": "zoo-base", "task": "embedded", "items": [item]})
                if not p.is_error:
                    predict_ms.append((time.perf_counter() - t) * 1000)
            import anyio

            await anyio.sleep(interval_s)
        merge_s = time.perf_counter() - t_start
        final = (await c.call_tool("get_job", {"job_id": job_id})).structured_content["jobs"][0]
        if final["state"] in ("queued", "running"):
            await c.call_tool("cancel_job", {"job_id": job_id})
    g = _stats(get_ms)
    return {
        "transport": transport, "method": method, "probe_n": probe_n, "merge_state": final["state"],
        "merge_error": final["error"], "merge_seconds": round(merge_s, 2), "stages_seen": stages,
        "get_job_ms": g, "predict_interaction_ms": _stats(predict_ms),
        "target_median_ms": TARGET_MEDIAN_MS,
        "meets_target": bool(g.get("n")) and g["median"] < TARGET_MEDIAN_MS,
        "cpu_count": os.cpu_count(),
    }


def bench_server_latency(zoo: str | Path | None = None, *, transport: str = "stdio", method: str = "es",
                         probe_n: int = 32, interval_s: float = 0.1, predict_every: int = 10,
                         timeout_s: float = 900.0, data_home: str | Path | None = None) -> dict[str, Any]:
    """Median/p95 latency of ``get_job`` (and ``predict_interaction``) while a merge job runs.

    ``zoo``: a built zoo directory (default ``$ES_MERGING_ZOO_DIR``; else the test preset is built
    into a temporary directory first, which takes a minute or more)."""
    import anyio

    if transport not in ("stdio", "inproc"):
        raise ValueError("transport must be 'stdio' or 'inproc'")
    with tempfile.TemporaryDirectory(prefix="esm-latency-") as tmp:
        zoo_path = Path(zoo or os.environ.get("ES_MERGING_ZOO_DIR") or Path(tmp) / "zoo")
        built = None
        if not (zoo_path / "zoo.json").exists():
            from es_merging.zoo.build import build_zoo

            t = time.perf_counter()
            build_zoo(zoo_path, preset="test", seed=0)
            built = round(time.perf_counter() - t, 1)
        home = Path(data_home) if data_home else Path(tmp) / "home"
        result = anyio.run(_run, zoo_path.resolve(), home, transport, method, probe_n, interval_s,
                           predict_every, timeout_s)
    result["zoo"] = str(zoo_path)
    if built is not None:
        result["zoo_built_s"] = built
    return result


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default=None, help="a built zoo directory (default: build the test preset)")
    p.add_argument("--transport", choices=["stdio", "inproc"], default="stdio")
    p.add_argument("--method", default="es")
    p.add_argument("--probe-n", type=int, default=32)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between get_job calls")
    p.add_argument("--predict-every", type=int, default=10, help="a predict_interaction call every N polls (0: none)")


@register("server-latency", add_arguments=_arguments)
def server_latency(args: argparse.Namespace) -> dict[str, Any]:
    """get_job latency while a merge job runs (MCP server responsiveness)."""
    return bench_server_latency(args.zoo, transport=args.transport, method=args.method, probe_n=args.probe_n,
                                interval_s=args.interval, predict_every=args.predict_every)
