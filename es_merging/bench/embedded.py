"""`es-merging bench --suite embedded`: every merge method against the base, each expert alone and a
task-specific fine-tuned model, on the embedded world (DESIGN section 7).

Protocol (nothing is tuned on the test split; every method runs with its declared defaults):
- the zoo (``--zoo DIR``, else ``$ES_MERGING_ZOO_DIR``, else the ``--preset`` is built into a
  temporary directory) gives the base, the three experts and the world;
- per seed s: ES-family merges read a probe of ``--probe-n`` samples drawn by
  :func:`es_merging.zoo.probe_from_zoo` from the world's TRAINING split (seed s), every merge runs
  through :func:`es_merging.merge_api.run_merge` with seed s into a temporary directory and is
  loaded with :func:`es_merging.load_model`; the task-specific model is the base plus a LoRA with
  the experts' rank, trained (seed s) on raw-input interactive examples of the training split with
  one expert's budget (steps x batch x learning rate of the preset), cross-entropy on the whole
  reply (descriptors and answer), the experts' encoders frozen;
- evaluation: ``--n`` samples of HELD-OUT entities (seed 10000 + s), raw inputs, through
  :func:`es_merging.predict.predict` with the ``embedded`` task (state each descriptor, then answer):
  preservation = each modality's descriptor-slot accuracy; interactive accuracy, macro-F1 and
  AUROC of P(Yes);
- preservation_ratio[m] = (model - chance) / (m's expert - chance), per seed, then averaged;
- mean and sample standard deviation over seeds (sd is 0 with one seed).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from es_merging.bench import register
from es_merging.errors import EsMergingError

log = logging.getLogger(__name__)

MODALITIES = ("molecule", "protein", "cell")
MERGE_METHODS = ("average", "task_arithmetic", "ties", "dare_ties", "es_layer", "es_element", "es")
MODES = ("factor", "delta")
FINETUNED = "finetuned"


def default_entries() -> list[tuple[str, str | None]]:
    """(method, mode) of the full suite: base, each expert, every merge in both modes, fine-tuned."""
    out: list[tuple[str, str | None]] = [("base", None)] + [(m, None) for m in MODALITIES]
    out += [(meth, mode) for meth in MERGE_METHODS for mode in MODES]
    out.append((FINETUNED, None))
    return out


def parse_methods(spec: str | None) -> list[tuple[str, str | None]]:
    """``--methods`` filter: comma-separated ``base``, ``experts`` or an expert name, ``finetuned``,
    a merge method (both modes) or ``method:mode``. None = the full suite."""
    if not spec:
        return default_entries()
    out: list[tuple[str, str | None]] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        name, _, mode = token.partition(":")
        if name == "experts":
            out += [(m, None) for m in MODALITIES]
        elif name in ("base", FINETUNED, *MODALITIES):
            out.append((name, None))
        elif name in MERGE_METHODS or name in ("dare_linear",):
            if mode and mode not in MODES:
                raise EsMergingError(f"--methods {token!r}: mode must be factor or delta")
            out += [(name, mode)] if mode else [(name, m) for m in MODES]
        else:
            raise EsMergingError(f"--methods: unknown entry {token!r}; use base, experts, molecule, protein, cell, "
                                 f"finetuned, {', '.join(MERGE_METHODS)} (optionally :factor or :delta)")
    seen = set()
    return [e for e in out if not (e in seen or seen.add(e))]


# ---------------------------------------------------------------------------------------------- zoo
def resolve_zoo(zoo: str | None, preset: str, workdir: Path, progress=None) -> tuple[Path, dict]:
    from es_merging.zoo import load_zoo_report

    zoo = zoo or os.environ.get("ES_MERGING_ZOO_DIR")
    if zoo:
        path = Path(zoo)
        report = load_zoo_report(path)
        return path, {"path": str(path), "built": False, "preset": report["preset"]["name"]}
    from es_merging.zoo.build import build_zoo

    t = time.time()
    path = workdir / f"zoo-{preset}"
    build_zoo(path, preset=preset, seed=0, progress=progress)
    return path, {"path": None, "built": True, "preset": preset, "build_seconds": round(time.time() - t, 1)}


# ---------------------------------------------------------------------------------------------- fine-tune
def train_task_lora(zoo_dir: Path, *, seed: int, steps: int | None = None, progress=None):
    """The task-specific reference: base + one LoRA (the experts' rank, alpha and target modules)
    trained on raw-input interactive examples from the training split, one expert's budget."""
    import torch
    from peft import LoraConfig, get_peft_model

    from es_merging.mllm import MultimodalModel
    from es_merging.zoo import load_zoo_report, zoo_world
    from es_merging.zoo.train import lm_loss, optimizer_step, render_example, targets

    report = load_zoo_report(zoo_dir)
    preset = report["preset"]
    cfg = json.loads((zoo_dir / MODALITIES[0] / "adapter_config.json").read_text())
    steps = steps or int(preset["expert_steps"])
    batch, lr = int(preset["batch"]), float(preset["lr_expert"])
    model = MultimodalModel.load(  # base + every expert's encoder (frozen), no adapter
        zoo_dir / "base", encoders={m: zoo_dir / m / "encoder" for m in MODALITIES
                                    if (zoo_dir / m / "encoder" / "config.json").exists()})
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    lora = LoraConfig(r=int(cfg["r"]), lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                      target_modules=sorted(cfg["target_modules"]), task_type="CAUSAL_LM")
    model.backbone = get_peft_model(model.backbone, lora, adapter_name="task")
    model._active = "task"
    params = [p for n, p in model.backbone.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    world = zoo_world(zoo_dir)
    pool = world.samples(steps * batch, "train", seed=50_000 + seed)
    spans = {m: "raw" for m in MODALITIES}
    eos = model.tokenizer.eos_token
    model.train()
    for enc in model.encoders.values():
        enc.eval()
    t0, losses = time.time(), []
    for step in range(steps):
        chunk = pool[step * batch:(step + 1) * batch]
        rendered = [render_example(model.renderer, ws, spans, eos) for ws in chunk]
        b, labels, _ = targets(model, rendered, [None] * len(rendered), [False] * len(rendered))
        logits = model.forward(b).logits
        loss = lm_loss(logits, labels)
        losses.append(optimizer_step(opt, params, loss, step, steps, lr))
        if progress and (step % 10 == 0 or step == steps - 1):
            progress("fine-tune", step + 1, steps)
    model.eval()
    model.clear_cache()
    stats = {"steps": steps, "batch": batch, "lr": lr, "rank": int(cfg["r"]), "seconds": round(time.time() - t0, 1),
             "final_loss": round(sum(losses[-10:]) / min(10, len(losses)), 4)}
    return model, stats


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate(model, world_samples, *, batch_size: int = 32) -> dict[str, Any]:
    from es_merging.predict import auroc, macro_f1, predict
    from es_merging.zoo.train import to_probe_sample
    from es_merging.zoo.world import ANSWERS

    queries = [to_probe_sample(ws, i).model_copy(update={"descriptors": {}, "answer": None})
               for i, ws in enumerate(world_samples)]
    preds = predict(model, queries, "embedded", batch_size=batch_size)
    bad = [p for p in preds if not p.ok]
    if bad:
        raise EsMergingError(f"{len(bad)} evaluation samples failed: {bad[0].error}")
    n = len(world_samples)
    truth = [ws.answer for ws in world_samples]
    choice = [p.choice for p in preds]
    return {
        "interactive": {
            "accuracy": sum(c == t for c, t in zip(choice, truth)) / n,
            "macro_f1": macro_f1(choice, truth, list(ANSWERS)),
            "auroc": auroc([p.probabilities["Yes"] for p in preds], [t == "Yes" for t in truth]),
        },
        "preservation": {m: sum(p.slots[m] == ws.entity(m).descriptor for p, ws in zip(preds, world_samples)) / n
                         for m in MODALITIES},
        "n": n,
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _label(method: str, mode: str | None) -> str:
    return f"{method} ({mode})" if mode else method


# ---------------------------------------------------------------------------------------------- suite
def run_suite(*, zoo: str | None = None, preset: str = "tiny", seeds: int = 3, methods: str | None = None,
              n: int | None = None, probe_n: int = 64, batch_size: int = 32, finetune_steps: int | None = None,
              progress: Callable[[str, int, int], None] | None = None, command: str | None = None) -> dict[str, Any]:
    from es_merging import load_model
    from es_merging.merge_api import run_merge
    from es_merging.options import MergeOptions
    from es_merging.predict import load_zoo_model
    from es_merging.zoo import probe_from_zoo, zoo_world
    from es_merging.zoo.world import DESCRIPTORS

    if seeds < 1:
        raise EsMergingError("--seeds must be >= 1")
    entries = parse_methods(methods)
    t_all = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="es-merging-bench-embedded-"))
    try:
        zoo_dir, zoo_info = resolve_zoo(zoo, preset, workdir, progress)
        from es_merging.zoo import load_zoo_report

        report = load_zoo_report(zoo_dir)
        n = n or int(report["preset"]["eval_n"])
        world = zoo_world(zoo_dir)
        chance = {m: 1 / len(DESCRIPTORS[m]) for m in MODALITIES}
        zoo_model = None
        per: dict[tuple[str, str | None], list[dict[str, Any]]] = {e: [] for e in entries}
        timings: dict[str, float] = {}
        total = seeds * len(entries)
        done = 0
        for seed in range(seeds):
            eval_samples = world.samples(n, "heldout", seed=10_000 + seed)
            probe_path = workdir / f"probe-{seed}.json"
            probe_from_zoo(zoo_dir, n=probe_n, seed=seed).save(probe_path)
            expert_scores: dict[str, float] = {}
            needed = list(entries)
            # each expert's own-slot accuracy is the preservation reference, so experts always run
            for m in MODALITIES:
                if (m, None) not in needed:
                    needed.insert(0, (m, None))
            for method, mode in needed:
                t = time.time()
                info: dict[str, Any] = {}
                try:
                    if method == "base" or method in MODALITIES:
                        if zoo_model is None:
                            zoo_model = load_zoo_model(zoo_dir, "base")
                        zoo_model.set_adapter(None if method == "base" else method)
                        model = zoo_model
                    elif method == FINETUNED:
                        model, train_stats = train_task_lora(zoo_dir, seed=seed, steps=finetune_steps,
                                                             progress=progress)
                        info = {"training": train_stats}
                    else:
                        out = workdir / f"{method}-{mode}-{seed}"
                        res = run_merge(MergeOptions(
                            base=zoo_dir / "base", experts=[zoo_dir / m for m in MODALITIES], method=method,
                            mode=mode, probe=probe_path if method.startswith("es") else None, out=out, seed=seed))
                        info = {"merge_timings": res.timings}
                        model = load_model(out)
                    t_build = time.time() - t
                    t = time.time()
                    scores = evaluate(model, eval_samples, batch_size=batch_size)
                    scores["seconds"] = {"build": round(t_build, 2), "evaluate": round(time.time() - t, 2)}
                    scores.update(info)
                except EsMergingError as exc:  # one failing method never sinks the suite: its row says why
                    if method in MODALITIES or method == "base":
                        raise
                    log.error("%s: %s", _label(method, mode), exc)
                    scores = {"error": f"{type(exc).__name__}: {exc}", "seconds": {"build": round(time.time() - t, 2)}}
                if method in MODALITIES:
                    expert_scores[method] = scores["preservation"][method]
                if method not in ("base", *MODALITIES):
                    model = None
                    if method != FINETUNED:
                        shutil.rmtree(workdir / f"{method}-{mode}-{seed}", ignore_errors=True)
                if (method, mode) in per:
                    per[(method, mode)].append(scores)
                    done += 1
                    if progress:
                        progress(f"seed {seed}: {_label(method, mode)}", done, total)
                timings[f"{_label(method, mode)} seed {seed}"] = round(sum(scores["seconds"].values()), 2)
        results = []
        for (method, mode), all_runs in per.items():
            runs = [r for r in all_runs if "error" not in r]
            row: dict[str, Any] = {"method": method, "mode": mode, "label": _label(method, mode),
                                   "kind": ("reference" if method in ("base", FINETUNED) else
                                            "expert" if method in MODALITIES else "merge"),
                                   "interactive": {}, "interactive_sd": {}, "preservation": {},
                                   "preservation_sd": {}, "preservation_ratio": {}}
            for metric in ("accuracy", "macro_f1", "auroc"):
                row["interactive"][metric], row["interactive_sd"][metric] = _mean_sd(
                    [r["interactive"][metric] for r in runs])
            row["interactive"]["sd"] = dict(row["interactive_sd"])
            for m in MODALITIES:
                row["preservation"][m], row["preservation_sd"][m] = _mean_sd([r["preservation"][m] for r in runs])
            row["per_seed"] = all_runs
            errors = [r["error"] for r in all_runs if "error" in r]
            if errors:
                row["error"] = errors[0] + (f" ({len(errors)} of {len(all_runs)} seeds)" if len(all_runs) > 1 else "")
            results.append(_round(row))
        timings["total"] = round(time.time() - t_all, 1)
        return finalize({
            "suite": "embedded",
            "command": command,
            "seeds": list(range(seeds)),
            "zoo": zoo_info,
            "preset": report["preset"]["name"],
            "eval": {"n": n, "split": "heldout", "sample_seed": "10000 + seed", "protocol": "describe-then-answer, raw inputs"},
            "probe": {"n": probe_n, "split": "train", "seed": "seed"},
            "chance": {"interactive_accuracy": 0.5, **{f"preservation_{m}": round(chance[m], 4) for m in MODALITIES}},
            "zoo_quality": report.get("quality"),
            "zoo_gates": report.get("gates"),
            "results": results,
            "timings_s": timings,
            "threads": _threads(),
        })
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _threads() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_num_threads(), "cpus": os.cpu_count(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def _round(obj, nd: int = 4):
    if isinstance(obj, float):
        return None if math.isnan(obj) else round(obj, nd)
    if isinstance(obj, dict):
        return {k: _round(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v, nd) for v in obj]
    return obj


RATIO_MIN_MARGIN = 0.05  # an expert closer than this to chance on its own slot leaves the ratio undefined


def finalize(data: dict[str, Any]) -> dict[str, Any]:
    """Preservation ratios and notes, computed from the rows' per-seed results (so that a saved
    JSON can be re-finalised). ratio[m] = (model - chance) / (expert_m - chance) per seed, then
    the mean; undefined (null) for modality m when m's expert (mean over seeds) is within
    RATIO_MIN_MARGIN of chance, and for a seed where that seed's expert is."""
    chance = {m: data["chance"][f"preservation_{m}"] for m in MODALITIES}
    experts = {r["method"]: r for r in data["results"] if r["method"] in MODALITIES}
    undefined = {m for m in MODALITIES if m not in experts or experts[m]["preservation"].get(m) is None
                 or experts[m]["preservation"][m] - chance[m] < RATIO_MIN_MARGIN}
    for row in data["results"]:
        ratios: dict[str, list[float]] = {m: [] for m in MODALITIES}
        for s, run in enumerate(row["per_seed"]):
            if "error" in run:
                continue
            run["preservation_ratio"] = {}
            for m in MODALITIES:
                ref = experts.get(m, {}).get("per_seed", [{}] * (s + 1))[s].get("preservation", {}).get(m)
                if m in undefined or ref is None or ref - chance[m] < RATIO_MIN_MARGIN:
                    run["preservation_ratio"][m] = None
                    continue
                value = (run["preservation"][m] - chance[m]) / (ref - chance[m])
                run["preservation_ratio"][m] = round(value, 4)
                ratios[m].append(value)
        row["preservation_ratio"] = {m: round(statistics.fmean(v), 4) if v else None for m, v in ratios.items()}
    data["notes"] = notes(data, undefined)
    return data


def notes(data: dict[str, Any], undefined: set[str] = frozenset()) -> list[str]:
    """Plain statements computed from the table (never written by hand)."""
    results = data["results"]
    out = []
    gates = data.get("zoo_gates") or {}
    failed = [g for g, ok in gates.items() if g != "all_pass" and ok is False]
    if failed:
        out.append(f"the zoo fails its quality gates ({', '.join(failed)}): where an expert does not perceive "
                   "its modality there is nothing for a merge to preserve, so those columns say little")
    for m in sorted(undefined):
        out.append(f"the {m} expert is within {RATIO_MIN_MARGIN} of chance on its own slot (mean over seeds): "
                   f"{m} ratios are undefined (null)")
    merges = [r for r in results if r["kind"] == "merge" and r["interactive"]["accuracy"] is not None]
    if not merges:
        return out
    n = data.get("eval", {}).get("n") or 1
    n_total = n * max(1, len(data.get("seeds", [0])))

    def acc(r):
        return r["interactive"]["accuracy"] if r["interactive"]["accuracy"] is not None else -1.0

    def mean_ratio(r):
        vals = [v for v in r["preservation_ratio"].values() if v is not None]
        return statistics.fmean(vals) if vals else float("-inf")

    def band(a, b):  # 95% band of a difference of two accuracies on n_total samples each (binomial)
        p = (a + b) / 2
        return 1.96 * math.sqrt(max(2 * p * (1 - p) / n_total, 0.0))

    best = max(merges, key=acc)
    out.append(f"best merge by interactive accuracy: {best['label']} ({acc(best):.3f})")
    es = [r for r in merges if r["method"].startswith("es")]
    base = [r for r in merges if not r["method"].startswith("es")]
    if es and base:
        best_es, best_base = max(es, key=acc), max(base, key=acc)
        d, w = acc(best_es) - acc(best_base), band(acc(best_es), acc(best_base))
        verdict = "beats" if d > 0 else "does not beat"
        noise = "within" if abs(d) <= w else "outside"
        out.append(f"ES-Merging {verdict} the best baseline merge on interactive accuracy: "
                   f"{best_es['label']} {acc(best_es):.3f} vs {best_base['label']} {acc(best_base):.3f} "
                   f"(difference {d:+.3f}, {noise} the 95% sampling band ±{w:.3f})")
        if any(mean_ratio(r) != float("-inf") for r in merges):
            be, bb = max(es, key=mean_ratio), max(base, key=mean_ratio)
            verdict = "beats" if mean_ratio(be) > mean_ratio(bb) else "does not beat"
            out.append(f"ES-Merging {verdict} the best baseline on mean preservation ratio (defined modalities): "
                       f"{be['label']} {mean_ratio(be):.3f} vs {bb['label']} {mean_ratio(bb):.3f}")
    ft = [r for r in results if r["method"] == FINETUNED and r["interactive"]["accuracy"] is not None]
    if ft:
        verdict = "above" if acc(best) > acc(ft[0]) else "below"
        out.append(f"the best merge is {verdict} the task-specific fine-tuned model "
                   f"({acc(best):.3f} vs {acc(ft[0]):.3f})")
    chance_hits = [r["label"] for r in merges if abs(acc(r) - 0.5) <= band(acc(r), 0.5) / math.sqrt(2)]
    if len(chance_hits) == len(merges):
        out.append("every merge is within sampling noise of chance (0.5) on the interactive task")
    return out


def render_markdown(data: dict[str, Any]) -> str:
    """The README table, generated from the suite's JSON."""
    def f(v, sd=None):
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None and len(data.get("seeds", [])) > 1 else "")

    lines = [
        f"Embedded suite, preset `{data['preset']}`, seeds {data['seeds']}, {data['eval']['n']} held-out samples per seed "
        f"(describe-then-answer on raw inputs). Command: `{data.get('command') or 'es-merging bench --suite embedded'}`.",
        "",
        "| model | mode | interactive acc | macro-F1 | AUROC | molecule | protein | cell | ratio mol | ratio prot | ratio cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        i, isd, p, psd, pr = r["interactive"], r["interactive_sd"], r["preservation"], r["preservation_sd"], r["preservation_ratio"]
        lines.append("| " + " | ".join([
            r["method"], r["mode"] or "", f(i["accuracy"], isd["accuracy"]), f(i["macro_f1"], isd["macro_f1"]),
            f(i["auroc"], isd["auroc"]), *(f(p[m], psd[m]) for m in MODALITIES), *(f(pr[m]) for m in MODALITIES)]) + " |")
    ch = data["chance"]
    lines += ["", f"Chance: interactive 0.5; descriptor slots molecule {ch['preservation_molecule']:.3f}, "
                  f"protein {ch['preservation_protein']:.3f}, cell {ch['preservation_cell']:.3f}. "
                  "Ratio = (model - chance) / (that modality's expert - chance).", ""]
    lines += [f"- {n}" for n in data.get("notes", [])]
    lines += [f"- {r['label']} FAILED: {r['error']}" for r in data["results"] if r.get("error")]
    return "\n".join(lines) + "\n"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", default=None, help="a built zoo (default $ES_MERGING_ZOO_DIR, else build --preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "test"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=None, help="subset, e.g. 'base,experts,average:delta,es,finetuned'")
    p.add_argument("--n", type=int, default=None, help="held-out evaluation samples per seed (default: the preset's eval_n)")
    p.add_argument("--probe-n", type=int, default=64, help="probe samples for the ES family (training split)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--finetune-steps", type=int, default=None, help="default: the preset's expert_steps")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here")


@register("embedded", add_arguments=_arguments)
def bench_embedded(args: argparse.Namespace) -> dict[str, Any]:
    """Embedded suite: preservation per modality and interactive accuracy for every merge method."""
    from es_merging.cli.progress import ProgressPrinter

    command = "es-merging bench --suite embedded " + " ".join(sys.argv[sys.argv.index("embedded") + 1:]) \
        if "embedded" in sys.argv else None
    data = run_suite(zoo=args.zoo, preset=args.preset, seeds=args.seeds, methods=args.methods, n=args.n,
                     probe_n=args.probe_n, batch_size=args.batch_size, finetune_steps=args.finetune_steps,
                     progress=ProgressPrinter(), command=command)
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(data))
    return data
