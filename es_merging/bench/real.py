"""`es-merging bench --suite real --data-dir ../shared/data`: the zoo's models and their merges on
public data (read in place, never copied), cold-drug splits, two protocols.

Datasets (see ``DATA_DIR/SOURCES.md``):
- ``davis``: Davis kinase DTI, task ``dti``; label Interacts when pKd >= 7.
- ``gdsc``: GDSC2 drug response, task ``drug_response``; a (drug, cell line) pair is Sensitive when
  its ln IC50 is below that drug's median over all its cell lines (the per-drug median split).
- ``triples``: GDSC2 (drug, putative target, cell line), task ``triple_effect``; the drug's ln IC50
  tertiles over its cell lines: lowest third Strong effect, middle Weak effect, top No effect.
Inputs as the models take them: drugs as SMILES (fingerprint encoder); a protein as
:func:`es_merging.adapt.protein_view`, the ``--protein-crop`` residues (default 32: the zoo's
protein encoder was trained on 20-36) centred on its PROSITE family signature (for a kinase the
catalytic loop), the central ones when no family signature matches (until the adaptation step
existed this was always the central crop, default 128; the experts are now adapted on exactly these
windows); a cell line as its genes ranked by the per-gene z-scored CCLE expression of
``gdsc_expression_zscore_580x706.csv`` (top ``--cell-genes``).

Per seed s: the drugs are split at random (seed s) into train and test drugs (``--test-fraction``);
no drug is in both (cold drug). ``--n-train`` and ``--n-test`` pairs are then drawn (seed s) from the
pairs of the train and test drugs respectively, stratified by label (equal counts per label when
available: Davis is 8% positive). Protocols, both reported:
- ``kshot``: option log-likelihood scoring (:func:`es_merging.predict.predict`) with the ``--k`` most
  similar TRAINING pairs as labelled turns in the prompt;
- ``head``: a multinomial logistic regression (torch, L-BFGS, fixed L2 ``1e-2``, standardised
  features; no tuning) on the frozen model's mean-pooled last hidden states of the prompt,
  fitted on the training pairs, evaluated on the test pairs.
Metrics: accuracy, macro-F1, AUROC of the positive option (Interacts, Sensitive, Strong effect vs
the rest); mean and sd over seeds. Merges: :func:`es_merging.merge_api.run_merge` of the zoo's
three experts (ES-family probe from the zoo's training world, as in the embedded suite).

Adaptation (default on; ``--no-adapt`` runs the zoo's experts as built): before anything is
merged, :func:`es_merging.adapt.adapt_zoo` adapts the zoo's experts once per suite run (seed
``--adapt-seed``, ``--adapt-steps`` per expert) to the datasets' drugs, targets and cell lines, with
the same protein windows and cell gene lists as the suite's inputs; base, experts and merges are
then the ADAPTED experts and their merges. Its labels come from structure (Crippen LogP), sequence
(PROSITE signatures) and cancer type, never from a task label, so it is label-free like
pre-training and sees every drug, the cold-drug test drugs included; no task label and no test
pair is used to choose anything. Its record (seed, steps, label counts, held-out own-slot accuracy
before/after per expert) is the JSON's ``adaptation``. A ``--zoo`` that is already adapted
(``es-merging adapt``) is used as it is, its record reported.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from es_merging.bench import register
from es_merging.errors import EsMergingError

DATASETS = ("davis", "gdsc", "triples")
TASK_OF = {"davis": "dti", "gdsc": "drug_response", "triples": "triple_effect"}
POSITIVE = {"davis": "Interacts", "gdsc": "Sensitive", "triples": "Strong effect"}
DEFAULT_MODELS = "base,experts,average,ties,es"
NO_ADAPTATION_NOTE = ("off (--no-adapt): the zoo's experts are used as built (no adaptation to the real drugs, "
                      "targets and cell lines), so the suite measures transfer from the embedded world")


@dataclass(frozen=True)
class Pair:
    drug: str
    smiles: str
    label: str
    protein_id: str | None = None
    protein: str | None = None
    cell_id: str | None = None
    cell: tuple[str, ...] | None = None

    def sample(self, with_label: bool = False):
        from es_merging.probe import ProbeSample

        ident = "|".join(x for x in (self.drug, self.protein_id, self.cell_id) if x)
        return ProbeSample(id=ident, smiles=self.smiles, protein=self.protein,
                           cell=list(self.cell) if self.cell else None, answer=self.label if with_label else None)


# ============================================================================ splits
def cold_drug_split(drugs: Sequence[str], *, test_fraction: float = 0.3, seed: int = 0) -> tuple[list[str], list[str]]:
    """Seeded split of the DISTINCT drugs into (train, test); no drug is in both."""
    unique = sorted(set(drugs))
    if len(unique) < 2:
        raise EsMergingError("a cold-drug split needs at least two drugs")
    if not 0 < test_fraction < 1:
        raise EsMergingError("test_fraction must be between 0 and 1")
    rng = random.Random(f"cold-drug-{seed}")
    rng.shuffle(unique)
    n_test = min(len(unique) - 1, max(1, round(len(unique) * test_fraction)))
    return sorted(unique[n_test:]), sorted(unique[:n_test])


def stratified_sample(pairs: Sequence[Pair], n: int, seed: int, labels: Sequence[str]) -> list[Pair]:
    """n pairs, as equal per label as the pool allows (seeded)."""
    rng = random.Random(f"sample-{seed}-{n}")
    by = {lab: [p for p in pairs if p.label == lab] for lab in labels}
    for v in by.values():
        rng.shuffle(v)
    out: list[Pair] = []
    quota = n // len(labels)
    for lab in labels:
        out += by[lab][:quota]
    rest = [p for lab in labels for p in by[lab][quota:]]
    rng.shuffle(rest)
    out += rest[: n - len(out)]
    rng.shuffle(out)
    return out


# ============================================================================ data
def _viewer(crop: int):
    """protein_view(seq, crop), memoised per sequence (Davis repeats each target 68 times)."""
    from es_merging.adapt import protein_view

    cache: dict[str, str] = {}

    def view(seq: str) -> str:
        if seq not in cache:
            cache[seq] = protein_view(seq, crop)
        return cache[seq]

    return view


def _need(path: Path) -> Path:
    if not path.is_file():
        raise EsMergingError(f"{path} not found: give --data-dir pointing at the shared datasets (see SOURCES.md)")
    return path


def load_davis(data_dir: Path, *, crop: int = 32) -> list[Pair]:
    import pandas as pd

    df = pd.read_csv(_need(data_dir / "davis" / "davis_dti.csv.gz"))
    view = _viewer(crop)
    return [Pair(drug=str(r.drug_id), smiles=r.smiles, label="Interacts" if r.pKd >= 7 else "Does not interact",
                 protein_id=r.target_id, protein=view(r.sequence.replace("X", "")))
            for r in df.itertuples(index=False)]


def _cell_genes(data_dir: Path, top: int) -> dict[str, tuple[str, ...]]:
    import pandas as pd

    expr = pd.read_csv(_need(data_dir / "gdsc" / "gdsc_expression_zscore_580x706.csv"), index_col=0)
    genes = np.asarray(expr.columns)
    values = expr.to_numpy(dtype=np.float64)
    out = {}
    for name, row in zip(expr.index, values):
        order = np.lexsort((genes, -row))  # highest z first, ties by name
        out[str(name)] = tuple(str(g) for g in genes[order[:top]])
    return out


def load_gdsc(data_dir: Path, *, cell_genes: int = 32) -> list[Pair]:
    import pandas as pd

    df = pd.read_csv(_need(data_dir / "gdsc" / "gdsc2_response.csv"))
    cells = _cell_genes(data_dir, cell_genes)
    med = df.groupby("drug_id")["ln_ic50"].median()
    out = []
    for r in df.itertuples(index=False):
        if r.cell_line not in cells:
            continue
        out.append(Pair(drug=r.drug_id, smiles=r.smiles, label="Sensitive" if r.ln_ic50 < med[r.drug_id] else "Resistant",
                        cell_id=r.cell_line, cell=cells[r.cell_line]))
    return out


def load_triples(data_dir: Path, *, crop: int = 32, cell_genes: int = 32) -> list[Pair]:
    import pandas as pd

    tri = pd.read_csv(_need(data_dir / "triple" / "gdsc2_triples.csv"))
    drugs = pd.read_csv(_need(data_dir / "gdsc" / "gdsc2_drugs.csv"))
    seqs = pd.read_csv(_need(data_dir / "triple" / "target_sequences.csv")).dropna(subset=["sequence"])
    smiles = dict(zip(drugs.drug_id, drugs.smiles))
    seq = dict(zip(seqs.gene_symbol, seqs.sequence))
    cells = _cell_genes(data_dir, cell_genes)
    # tertiles of each drug's ln IC50 over its cell lines (each (drug, cell) once, whatever the targets)
    per_drug = tri.drop_duplicates(["drug_id", "cell_line"]).groupby("drug_id")["ln_ic50"]
    lo, hi = per_drug.quantile(1 / 3), per_drug.quantile(2 / 3)
    view = _viewer(crop)
    out = []
    for r in tri.itertuples(index=False):
        if r.drug_id not in smiles or r.target_gene not in seq or r.cell_line not in cells:
            continue
        label = ("Strong effect" if r.ln_ic50 <= lo[r.drug_id] else
                 "No effect" if r.ln_ic50 > hi[r.drug_id] else "Weak effect")
        out.append(Pair(drug=r.drug_id, smiles=smiles[r.drug_id], label=label, protein_id=r.target_gene,
                        protein=view(seq[r.target_gene]), cell_id=r.cell_line, cell=cells[r.cell_line]))
    return out


def load_dataset(name: str, data_dir: Path, *, crop: int, cell_genes: int) -> list[Pair]:
    if name == "davis":
        return load_davis(data_dir, crop=crop)
    if name == "gdsc":
        return load_gdsc(data_dir, cell_genes=cell_genes)
    if name == "triples":
        return load_triples(data_dir, crop=crop, cell_genes=cell_genes)
    raise EsMergingError(f"unknown dataset {name!r}; choose among {DATASETS}")


# ============================================================================ protocols
def logistic_head(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int,
                  *, l2: float = 1e-2, seed: int = 0) -> np.ndarray:
    """Multinomial logistic regression (standardised features, L-BFGS, fixed L2) -> test probabilities."""
    import torch

    torch.manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mu) / sd, dtype=torch.float64)
    xs = torch.tensor((x_test - mu) / sd, dtype=torch.float64)
    y = torch.tensor(y_train, dtype=torch.long)
    w = torch.zeros((xt.shape[1], n_classes), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.softmax(xs @ w + b, dim=-1).numpy()


def metrics(true: Sequence[str], pred: Sequence[str], p_pos: Sequence[float], options: Sequence[str],
            positive: str) -> dict[str, float]:
    from es_merging.predict import auroc, macro_f1

    n = len(true)
    return {"accuracy": sum(a == b for a, b in zip(true, pred)) / n if n else float("nan"),
            "macro_f1": macro_f1(pred, true, options),
            "auroc": auroc(p_pos, [t == positive for t in true])}


def run_protocols(model, train: list[Pair], test: list[Pair], task_name: str, *, k: int, seed: int,
                  batch_size: int, protocols: Sequence[str], support=None) -> dict[str, Any]:
    from es_merging.predict import SupportSet, features, get_task, predict

    task = get_task(task_name)
    positive = POSITIVE[{"dti": "davis", "drug_response": "gdsc", "triple_effect": "triples"}[task_name]]
    truth = [p.label for p in test]
    out: dict[str, Any] = {}
    if "kshot" in protocols:
        t = time.time()
        if support is None and k:
            support = SupportSet([p.sample(with_label=True) for p in train])
        preds = predict(model, [p.sample() for p in test], task, support=support, k=k, batch_size=batch_size)
        ok = [(p, lab) for p, lab in zip(preds, truth) if p.ok]
        out["kshot"] = {**metrics([lab for _, lab in ok], [p.choice for p, _ in ok],
                                  [p.probabilities[positive] for p, _ in ok], task.options, positive),
                        "k": k, "failed": len(preds) - len(ok), "seconds": round(time.time() - t, 2)}
    if "head" in protocols:
        t = time.time()
        xtr, etr = features(model, [p.sample() for p in train], task, batch_size=batch_size)
        xte, ete = features(model, [p.sample() for p in test], task, batch_size=batch_size)
        keep_tr = [i for i, e in enumerate(etr) if e is None]
        keep_te = [i for i, e in enumerate(ete) if e is None]
        classes = list(task.options)
        ytr = np.array([classes.index(train[i].label) for i in keep_tr])
        probs = logistic_head(xtr[keep_tr], ytr, xte[keep_te], len(classes), seed=seed)
        pred = [classes[int(j)] for j in probs.argmax(1)]
        out["head"] = {**metrics([truth[i] for i in keep_te], pred, list(probs[:, classes.index(positive)]),
                                 classes, positive),
                       "failed": len(test) - len(keep_te), "seconds": round(time.time() - t, 2)}
    return out


# ============================================================================ suite
def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return round(statistics.fmean(vals), 4), round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0


def _adapted_zoo(zoo_dir: Path, data_dir: Path, workdir: Path, *, adapt: bool, steps: int | None, seed: int,
                 protein_crop: int, cell_genes: int, progress=None) -> tuple[Path, dict[str, Any]]:
    """(zoo to evaluate, adaptation record): the zoo adapted once for this run (in ``workdir``), an
    already-adapted zoo as given (its inputs must match this run's), or the zoo as built."""
    from es_merging.adapt import adapt_zoo
    from es_merging.zoo import load_zoo_report

    existing = load_zoo_report(zoo_dir).get("adaptation")
    if not adapt:
        return zoo_dir, {"enabled": False, "note": NO_ADAPTATION_NOTE, "zoo_already_adapted": existing is not None}
    if existing is not None:
        if (existing["protein_window"], existing["cell_genes"]) != (protein_crop, cell_genes):
            raise EsMergingError(
                f"zoo {zoo_dir} was adapted with protein window {existing['protein_window']} and "
                f"{existing['cell_genes']} cell genes; run the suite with --protein-crop {existing['protein_window']} "
                f"--cell-genes {existing['cell_genes']}, or give the unadapted zoo")
        if steps is not None and steps != existing["steps"]:
            raise EsMergingError(f"zoo {zoo_dir} is already adapted ({existing['steps']} steps); drop --adapt-steps "
                                 "or give the unadapted zoo")
        return zoo_dir, {"enabled": True, "done_by": "the given zoo (es-merging adapt)", **existing}
    record = adapt_zoo(zoo_dir, data_dir, workdir / "zoo-adapted", steps=steps, seed=seed,
                       protein_window=protein_crop, cell_genes=cell_genes, threads=None, progress=progress)
    return workdir / "zoo-adapted", {"enabled": True, "done_by": "this suite run", **record}


def run_suite(*, data_dir: str | Path, zoo: str | None = None, preset: str = "tiny", seeds: int = 3,
              datasets: Sequence[str] = DATASETS, models: str = DEFAULT_MODELS, n_train: int = 256,
              n_test: int = 128, k: int = 4, protein_crop: int = 32, cell_genes: int = 32,
              test_fraction: float = 0.3, protocols: Sequence[str] = ("kshot", "head"), batch_size: int = 16,
              probe_n: int = 64, adapt: bool = True, adapt_steps: int | None = None, adapt_seed: int = 0,
              progress=None, command: str | None = None) -> dict[str, Any]:
    from es_merging import load_model
    from es_merging.bench.embedded import MODALITIES, _label, parse_methods, resolve_zoo
    from es_merging.merge_api import run_merge
    from es_merging.options import MergeOptions
    from es_merging.predict import SupportSet, get_task, load_zoo_model
    from es_merging.zoo import probe_from_zoo

    data_dir = Path(data_dir)
    _need(data_dir / "SOURCES.md")
    entries = [e for e in parse_methods(models) if e[0] != "finetuned"]
    t_all = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="es-merging-bench-real-"))
    try:
        zoo_dir, zoo_info = resolve_zoo(zoo, preset, workdir, progress)
        t = time.time()
        zoo_dir, adaptation = _adapted_zoo(zoo_dir, data_dir, workdir, adapt=adapt, steps=adapt_steps,
                                           seed=adapt_seed, protein_crop=protein_crop, cell_genes=cell_genes,
                                           progress=progress)
        adapt_seconds = round(time.time() - t, 1)
        data: dict[str, list[Pair]] = {}
        info: dict[str, Any] = {}
        for name in datasets:
            pairs = load_dataset(name, data_dir, crop=protein_crop, cell_genes=cell_genes)
            data[name] = pairs
            counts: dict[str, int] = {}
            for p in pairs:
                counts[p.label] = counts.get(p.label, 0) + 1
            info[name] = {"task": TASK_OF[name], "pairs": len(pairs), "drugs": len({p.drug for p in pairs}),
                          "labels": counts}
        per: dict[tuple[str, str | None, str, str], list[dict[str, Any]]] = {}
        zoo_model = None
        total = seeds * len(entries)
        done = 0
        splits: dict[str, list[dict[str, Any]]] = {name: [] for name in datasets}
        for seed in range(seeds):
            sets = {}
            for name in datasets:
                train_drugs, test_drugs = cold_drug_split([p.drug for p in data[name]], test_fraction=test_fraction,
                                                          seed=seed)
                tr, te = set(train_drugs), set(test_drugs)
                options = list(get_task(TASK_OF[name]).options)
                train = stratified_sample([p for p in data[name] if p.drug in tr], n_train, seed, options)
                test = stratified_sample([p for p in data[name] if p.drug in te], n_test, seed + 1000, options)
                assert not ({p.drug for p in train} & {p.drug for p in test})
                support = SupportSet([p.sample(with_label=True) for p in train]) if k and "kshot" in protocols else None
                sets[name] = (train, test, support)
                splits[name].append({"seed": seed, "train_drugs": len(tr), "test_drugs": len(te),
                                     "n_train": len(train), "n_test": len(test)})
            probe_path = workdir / f"probe-{seed}.json"
            probe_from_zoo(zoo_dir, n=probe_n, seed=seed).save(probe_path)
            for method, mode in entries:
                t = time.time()
                if method == "base" or method in MODALITIES:
                    if zoo_model is None:
                        zoo_model = load_zoo_model(zoo_dir, "base")
                    zoo_model.set_adapter(None if method == "base" else method)
                    model = zoo_model
                else:
                    out = workdir / f"{method}-{mode}-{seed}"
                    try:
                        run_merge(MergeOptions(base=zoo_dir / "base", experts=[zoo_dir / m for m in MODALITIES],
                                               method=method, mode=mode,
                                               probe=probe_path if method.startswith("es") else None, out=out,
                                               seed=seed))
                    except EsMergingError as exc:
                        for name in datasets:
                            for proto in protocols:
                                per.setdefault((method, mode, name, proto), []).append(
                                    {"error": f"{type(exc).__name__}: {exc}"})
                        continue
                    model = load_model(out)
                for name in datasets:
                    train, test, support = sets[name]
                    res = run_protocols(model, train, test, TASK_OF[name], k=k, seed=seed, batch_size=batch_size,
                                        protocols=protocols, support=support)
                    for proto, r in res.items():
                        per.setdefault((method, mode, name, proto), []).append({"seed": seed, **r})
                if method not in ("base", *MODALITIES):
                    model = None
                    shutil.rmtree(workdir / f"{method}-{mode}-{seed}", ignore_errors=True)
                done += 1
                if progress:
                    progress(f"seed {seed}: {_label(method, mode)} ({round(time.time() - t)} s)", done, total)
        results = []
        for (method, mode, name, proto), runs in per.items():
            ok = [r for r in runs if "error" not in r]
            row: dict[str, Any] = {"method": method, "mode": mode, "label": _label(method, mode), "dataset": name,
                                   "task": TASK_OF[name], "protocol": proto, "metrics": {}, "sd": {}}
            for metric in ("accuracy", "macro_f1", "auroc"):
                row["metrics"][metric], row["sd"][metric] = _mean_sd([r[metric] for r in ok])
            row["per_seed"] = runs
            errors = [r["error"] for r in runs if "error" in r]
            if errors:
                row["error"] = errors[0]
            results.append(row)
        return {
            "suite": "real", "command": command, "seeds": list(range(seeds)), "data_dir": str(data_dir),
            "zoo": zoo_info, "datasets": info, "splits": splits,
            "protocol": {"k": k, "n_train": n_train, "n_test": n_test, "test_fraction": test_fraction,
                         "protein_crop": protein_crop, "cell_genes": cell_genes, "head": "logistic, L2 1e-2, LBFGS",
                         "split": "cold drug (seeded), label-stratified sampling"},
            "chance": {"davis": 0.5, "gdsc": 0.5, "triples": round(1 / 3, 4)},
            "adaptation": adaptation,
            "results": results,
            "timings_s": {"adaptation": adapt_seconds, "total": round(time.time() - t_all, 1)},
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def adaptation_summary(record: dict[str, Any] | str) -> str:
    """One line: what the adaptation did and its held-out own-slot accuracy before -> after."""
    if isinstance(record, str):  # JSON written before the adaptation step existed
        return record
    if not record.get("enabled"):
        return record["note"]
    parts = []
    for m, e in record["experts"].items():
        labels = ", ".join(f"{d} {n}" for d, n in record["labels"][m]["labelled"].items())
        b, a = e["heldout_real"]["before"], e["heldout_real"]["after"]
        wb, wa = e["heldout_world"]["before"]["accuracy"], e["heldout_world"]["after"]["accuracy"]
        parts.append(f"{m} ({labels}; held-out n={a['n']}: accuracy {b['accuracy']} -> {a['accuracy']}, balanced "
                     f"{b['balanced_accuracy']} -> {a['balanced_accuracy']}; world held-out {wb} -> {wa})")
    return (f"{record['steps']} steps per expert, seed {record['seed']}, real fraction {record['real_fraction']}, "
            f"labels from LogP / PROSITE / cancer type (no task label): " + "; ".join(parts))


def render_markdown(data: dict[str, Any]) -> str:
    def f(v, sd):
        if v is None:
            return "n/a"
        return f"{v:.3f}" + (f" ± {sd:.3f}" if sd is not None and len(data["seeds"]) > 1 else "")

    p = data["protocol"]
    lines = [f"Real-data suite, seeds {data['seeds']}, cold-drug splits, {p['n_train']} train / {p['n_test']} test "
             f"pairs per dataset and seed (label-stratified); k-shot k={p['k']}; head = {p['head']}. "
             f"Command: `{data.get('command') or 'es-merging bench --suite real'}`.", "",
             f"Expert adaptation to the real entities: {adaptation_summary(data['adaptation'])}.", ""]
    for name in data["datasets"]:
        rows = [r for r in data["results"] if r["dataset"] == name]
        lines += [f"**{name}** ({data['datasets'][name]['task']}, chance accuracy {data['chance'][name]})", "",
                  "| model | mode | protocol | accuracy | macro-F1 | AUROC |", "|---|---|---|---|---|---|"]
        for r in rows:
            m, sd = r["metrics"], r["sd"]
            lines.append(f"| {r['method']} | {r['mode'] or ''} | {r['protocol']} | {f(m['accuracy'], sd['accuracy'])} | "
                         f"{f(m['macro_f1'], sd['macro_f1'])} | {f(m['auroc'], sd['auroc'])} |"
                         + (f" failed: {r['error']}" if r.get("error") else ""))
        lines.append("")
    return "\n".join(lines)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("ES_MERGING_DATA_DIR", "../shared/data"))
    p.add_argument("--zoo", default=None, help="a built zoo (default $ES_MERGING_ZOO_DIR, else build --preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "test"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=DEFAULT_MODELS, help="models, as in the embedded suite's --methods")
    p.add_argument("--protocols", default="kshot,head")
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-test", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--protein-crop", type=int, default=32,
                   help="residues shown per protein, centred on its family signature (else central)")
    p.add_argument("--cell-genes", type=int, default=32)
    p.add_argument("--test-fraction", type=float, default=0.3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--no-adapt", dest="adapt", action="store_false",
                   help="run the zoo's experts as built (no adaptation to the real entities)")
    p.add_argument("--adapt-steps", type=int, default=None,
                   help="adaptation steps per expert (default: the zoo preset's expert_steps)")
    p.add_argument("--adapt-seed", type=int, default=0)
    p.add_argument("--markdown", default=None)


@register("real", add_arguments=_arguments)
def bench_real(args: argparse.Namespace) -> dict[str, Any]:
    """Real-data suite: Davis DTI, GDSC2 response, GDSC triples; cold-drug splits; k-shot and logistic head."""
    from es_merging.cli.progress import ProgressPrinter

    command = "es-merging bench --suite real " + " ".join(sys.argv[sys.argv.index("real") + 1:]) \
        if "real" in sys.argv else None
    data = run_suite(data_dir=args.data_dir, zoo=args.zoo, preset=args.preset, seeds=args.seeds,
                     datasets=[d.strip() for d in args.datasets.split(",") if d.strip()], models=args.methods,
                     n_train=args.n_train, n_test=args.n_test, k=args.k, protein_crop=args.protein_crop,
                     cell_genes=args.cell_genes, test_fraction=args.test_fraction,
                     protocols=[x.strip() for x in args.protocols.split(",") if x.strip()],
                     batch_size=args.batch_size, adapt=args.adapt, adapt_steps=args.adapt_steps,
                     adapt_seed=args.adapt_seed, progress=ProgressPrinter(), command=command)
    if args.markdown:
        Path(args.markdown).write_text(render_markdown(data))
    return data
