"""`bench merge-scale`: peak memory and speed of a three-expert dense TIES merge (density 0.2) on
synthetic Llama-shaped float32 checkpoints, and the same with twice the layers.

Each merge runs as a child process (the real `es-merging merge` command line); its peak resident
set is the kernel's own maximum (``os.wait4`` rusage ``ru_maxrss``, exact, not sampled), with a
psutil sampling thread as a cross-check. When mergekit is available (``--mergekit-bin`` or
``mergekit-yaml`` on PATH) it merges the same checkpoints, with the same method and density, in the
same run. Checkpoints and outputs live in a temporary directory that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from es_merging.bench import register

GB = 1e9


# ------------------------------------------------------------------ synthetic checkpoints
def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes (untied embeddings, no GQA)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def layers_for_size(size_gb: float, hidden: int, intermediate: int, vocab: int) -> int:
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    return max(1, round((size_gb * GB / 4 - fixed) / per_layer))


def write_checkpoints(root: Path, *, experts: int, layers: int, hidden: int, intermediate: int, vocab: int,
                      seed: int = 0, shard_gb: float = 1.0) -> tuple[Path, list[Path]]:
    """A base and ``experts`` fine-tunes (base + small noise), written tensor by tensor."""
    from es_merging.engine import OutSpec, ShardWriter

    shapes = llama_shapes(layers, hidden, intermediate, vocab)
    heads = max(1, hidden // 64) if hidden >= 64 else 1
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu"}
    dirs = [root / "base"] + [root / f"expert{i + 1}" for i in range(experts)]
    writers = []
    for d in dirs:
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        writers.append(ShardWriter(d, [OutSpec(k, s, "F32") for k, s in shapes],
                                   max_shard_bytes=int(shard_gb * GB), single_name="model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for key, shape in shapes:
        base = torch.ones(shape) if key.endswith("norm.weight") else torch.randn(shape, generator=g).mul_(0.02)
        writers[0].write(key, base)
        for w in writers[1:]:
            w.write(key, torch.randn(shape, generator=g).mul_(0.002).add_(base))
    for w in writers:
        w.finish()
    return dirs[0], dirs[1:]


# ------------------------------------------------------------------ measuring a child process
def _sample_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            out.append(rss)
        except psutil.Error:
            pass
        stop.wait(0.02)


def measure(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd``; wall time, exact peak RSS (rusage of this child) and sampled peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    samples: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_rss, args=(proc.pid, stop, samples), daemon=True)
    sampler.start()
    # drain the pipes in threads so a chatty child never blocks on a full pipe
    chunks: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda n=n, s=s: chunks.__setitem__(n, s.read()), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    for r in readers:
        r.join()
    return {
        "returncode": proc.returncode, "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "peak_rss_sampled_mb": round(max(samples, default=0) / 2**20, 1),
        "stdout": chunks.get("out", b"").decode(errors="replace")[-4000:],
        "stderr": chunks.get("err", b"").decode(errors="replace")[-4000:],
    }


def _es_merging_cmd(base: Path, experts: list[Path], out: Path, density: float) -> list[str]:
    return [sys.executable, "-m", "es_merging", "merge", "--base", str(base), "--experts", *map(str, experts),
            "--method", "ties", "--set", f"density={density}", "--mode", "delta", "--out", str(out), "--quiet"]


def mergekit_config(base: Path, experts: list[Path], density: float) -> str:
    """TIES as DESIGN defines it: top-k trim, sign by summed mass, disjoint mean (normalize), lambda 1."""
    lines = ["merge_method: ties", f"base_model: {json.dumps(str(base))}", "models:"]
    for e in experts:
        lines += [f"  - model: {json.dumps(str(e))}", "    parameters:", f"      density: {density}", "      weight: 1.0"]
    lines += ["parameters:", "  normalize: true", "  int8_mask: false", "dtype: float32", ""]
    return "\n".join(lines)


def find_mergekit(explicit: str | None) -> str | None:
    if explicit:
        return explicit if Path(explicit).exists() else None
    return shutil.which("mergekit-yaml")


def _mergekit_version(binary: str) -> str | None:
    python = Path(binary).parent / "python"
    if not python.exists():
        return None
    proc = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or None


def _run_pair(root: Path, base: Path, experts: list[Path], args, mergekit: str | None) -> dict[str, Any]:
    gb_read = sum(f.stat().st_size for d in [base, *experts] for f in d.glob("*.safetensors")) / GB
    out: dict[str, Any] = {"checkpoint_gb": round(gb_read / (len(experts) + 1), 3), "gb_read": round(gb_read, 3)}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ours, theirs = [], []
    for r in range(args.repeats):
        target = root / f"out-es-{r}"
        res = measure(_es_merging_cmd(base, experts, target, args.density), env=env, timeout=args.timeout)
        if res["returncode"] != 0:
            raise RuntimeError(f"es-merging merge failed ({res['returncode']}): {res['stderr']}")
        shutil.rmtree(target, ignore_errors=True)
        res["gb_per_s"] = round(gb_read / res["wall_s"], 3)
        ours.append({k: v for k, v in res.items() if k not in ("stdout", "stderr")})
        if mergekit:
            cfg = root / "mergekit.yml"
            cfg.write_text(mergekit_config(base, experts, args.density))
            target = root / f"out-mk-{r}"
            res = measure([mergekit, str(cfg), str(target), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                          timeout=args.timeout)
            shutil.rmtree(target, ignore_errors=True)
            if res["returncode"] != 0:
                theirs.append({"error": res["stderr"][-1500:], "returncode": res["returncode"]})
            else:
                res["gb_per_s"] = round(gb_read / res["wall_s"], 3)
                theirs.append({k: v for k, v in res.items() if k not in ("stdout", "stderr")})
    out["es_merging"] = _median_runs(ours)
    if mergekit:
        out["mergekit"] = _median_runs(theirs)
    return out


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"runs": runs, "error": runs[-1].get("error") if runs else "not run"}
    med = {k: statistics.median(r[k] for r in ok) for k in ("wall_s", "peak_rss_mb", "peak_rss_sampled_mb", "gb_per_s")}
    return {**med, "runs": runs}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-gb", type=float, default=1.5, help="size of each float32 checkpoint (base and experts)")
    p.add_argument("--layers", type=int, help="decoder layers (default: what --size-gb needs)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, help="MLP width (default 2.75 x hidden, rounded to 256)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--density", type=float, default=0.2, help="TIES density")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    p.add_argument("--mergekit-bin", help="path of mergekit-yaml (default: on PATH)")
    p.add_argument("--no-mergekit", action="store_true", help="skip mergekit even when installed")
    p.add_argument("--no-double", action="store_true", help="skip the doubled-layers run")
    p.add_argument("--mergekit-doubled", action="store_true",
                   help="also run mergekit on the doubled checkpoints (the ratio uses the first configuration)")
    p.add_argument("--workdir", help="where checkpoints are written (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per merge run")


@register("merge-scale", add_arguments=add_arguments)
def bench_merge_scale(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS and speed of a dense 3-expert TIES merge; doubled layers; mergekit side by side."""
    intermediate = args.intermediate or max(256, int(round(2.75 * args.hidden / 256)) * 256)
    layers = args.layers or layers_for_size(args.size_gb, args.hidden, intermediate, args.vocab)
    mergekit = None if args.no_mergekit else find_mergekit(args.mergekit_bin)
    workdir = Path(args.workdir) if args.workdir else None
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="es-merge-scale-", dir=workdir))
    result: dict[str, Any] = {
        "bench": "merge-scale", "method": "ties", "density": args.density, "experts": args.experts,
        "shapes": {"hidden": args.hidden, "intermediate": intermediate, "vocab": args.vocab, "layers": layers},
        "largest_tensor_mb": round(args.vocab * args.hidden * 4 / 2**20, 1),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "mergekit_bin": mergekit, "mergekit_version": _mergekit_version(mergekit) if mergekit else None,
    }
    try:
        runs = {}
        for label, n_layers in [("base", layers)] + ([] if args.no_double else [("doubled", 2 * layers)]):
            ckpt = root / label
            t0 = time.perf_counter()
            base, experts = write_checkpoints(ckpt, experts=args.experts, layers=n_layers, hidden=args.hidden,
                                              intermediate=intermediate, vocab=args.vocab, seed=args.seed)
            with_mk = mergekit if (label == "base" or args.mergekit_doubled) else None
            runs[label] = {"layers": n_layers, "build_s": round(time.perf_counter() - t0, 2),
                           **_run_pair(root, base, experts, args, with_mk)}
            shutil.rmtree(ckpt, ignore_errors=True)  # free the disk before the next configuration
        result["runs"] = runs
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result.update(_headline(runs, mergekit is not None))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _headline(runs: dict[str, Any], with_mergekit: bool) -> dict[str, Any]:
    ours = runs["base"]["es_merging"]
    out: dict[str, Any] = {
        "checkpoint_gb": runs["base"]["checkpoint_gb"], "peak_rss_mb": ours["peak_rss_mb"],
        "wall_s": ours["wall_s"], "gb_read_per_s": ours["gb_per_s"],
    }
    if "doubled" in runs:
        doubled = runs["doubled"]["es_merging"]
        out["peak_rss_doubled_mb"] = doubled["peak_rss_mb"]
        out["peak_ratio_doubled"] = round(doubled["peak_rss_mb"] / ours["peak_rss_mb"], 4)
        out["wall_s_doubled"] = doubled["wall_s"]
    mk = runs["base"].get("mergekit") if with_mergekit else None
    if mk and "error" not in mk:
        out.update(mergekit_wall_s=mk["wall_s"], mergekit_peak_rss_mb=mk["peak_rss_mb"],
                   wall_ratio_vs_mergekit=round(ours["wall_s"] / mk["wall_s"], 4),
                   peak_ratio_vs_mergekit=round(ours["peak_rss_mb"] / mk["peak_rss_mb"], 4))
    elif mk:
        out["mergekit_error"] = mk["error"]
    out["targets"] = {
        "peak_under_1_5_gb": out["peak_rss_mb"] * 2**20 < 1.5 * GB,
        "doubling_within_10pct": (abs(out["peak_ratio_doubled"] - 1) <= 0.10) if "peak_ratio_doubled" in out else None,
        "at_most_half_mergekit_time": (out["wall_ratio_vs_mergekit"] <= 0.5) if "wall_ratio_vs_mergekit" in out else None,
    }
    return out


def main(argv: list[str] | None = None) -> int:  # `python -m es_merging.bench.merge_scale`
    p = argparse.ArgumentParser(prog="merge-scale")
    add_arguments(p)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    res = bench_merge_scale(args)
    text = json.dumps(res, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
