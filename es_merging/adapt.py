"""`es-merging adapt`: adapt a zoo's experts to the real datasets' entities (the molecule expert to
their drugs, the protein expert to their targets, the cell expert to their cell lines), so that the
real-data suite measures the merge rather than how far embedded-world perception transfers.

Labels, in the world's descriptor vocabulary, come from documented rules that use NO task label
(no pKd, no IC50); they are label-free with respect to the benchmarks, like pre-training, so the
step may see every drug's structure, the cold-drug test drugs included:

- molecule: every distinct drug (canonical SMILES) of Davis (``davis/davis_dti.csv.gz``), GDSC2
  (``gdsc/gdsc2_response.csv``) and the triples' drug table (``gdsc/gdsc2_drugs.csv``), labelled by
  Crippen LogP with the world's own thresholds (:func:`es_merging.zoo.world.molecule_descriptor`:
  lipophilic >= 3.0, hydrophilic <= 1.0); the ambiguous middle is not used.
- protein: the Davis targets and ``triple/target_sequences.csv``, labelled by the PROSITE signatures
  of the three families (:data:`FAMILY_PATTERNS`: protein-kinase catalytic loop PS00108 / PS00109,
  trypsin-family serine-protease active sites PS00135 / PS00134, rhodopsin-family GPCR signature
  PS00237; the world's motifs HRDLKPEN, GDSGGPLV, TAAHCWKE and DRYLAIVH are pieces of these);
  a sequence matching exactly one family is labelled and shown as :func:`protein_view`, the
  ``window`` residues centred on the first signature match (the zoo's encoder saw 20-36 residues).
  The real data hold kinases only (no trypsin-family protease, no GPCR matches), so the protease
  and receptor slots get no real example: the record says so and those classes stay world-only.
- cell: the GDSC cell lines with expression (``gdsc/gdsc_expression_zscore_580x706.csv``, genes
  ranked as the real suite ranks them, top ``cell_genes``), joined on DepMap id (``BROAD_ID``) to
  ``gdsc/gdsc_cell_lines.csv`` and labelled from its ``cancer_type`` by :data:`CELL_LINEAGE`
  (T- and B-lymphoid leukaemias/lymphomas, acute myeloid leukaemia as the myeloid "monocyte").
On the shared data (SOURCES.md hashes): molecules lipophilic 149 / hydrophilic 19 (51 ambiguous
of 219); protein windows kinase 318 / protease 0 / receptor 0 (92 sequences match no signature;
the simpler HRD[LIVM]K[PA].N matches 139 of the 379 Davis sequences only, missing every tyrosine
kinase's HRDLAARN); cell lines T-cell 13 / B-cell 31 / monocyte 17 (519 of 580 unlabelled).

Training continues each expert's LoRA (never the base, never the frozen encoders) with the zoo's
own recipe, :func:`es_merging.zoo.train.train_experts` (own-raw CE; all-raw own-slot CE + KL to the
base elsewhere; text replay), one expert at a time on an :class:`AdaptWorld`: the zoo's world in
which, for the adapted modality, a drawn descriptor's entity is a real one with probability
``real_fraction`` (when that descriptor has real entities), else a world one; the other
modalities always come from the world. Descriptors stay uniformly drawn, so classes stay balanced.
A seeded, label-stratified ``heldout_fraction`` of the real entities is never trained on: each
expert's own-slot accuracy on them (all inputs raw, slots decided in order, as the zoo's gate
measures it; the other slots' entities from the world's held-out set) and on the world's held-out
entities is reported before and after adaptation (the "after" from the saved files, reloaded).
As every labelled real protein is a kinase, the protein record adds a control: how the protein slot
names the 30 real non-kinase targets of the triples (PARP1, HDAC1, BCL2, ...), which shows whether
the expert learnt the signature or merely "real-looking sequence -> kinase". Measured on a
tiny-preset zoo (400 steps, seed 0): held-out kinase recall 0.05 -> 0.95, but the non-kinases
called "kinase" 0.27 -> 0.73, so with kinase-only real labels the protein adaptation is largely
that shortcut (molecule balanced accuracy 0.49 -> 0.87, cell 0.64 -> 0.83 on the same run).

Output (written atomically: a temporary directory renamed at the end)::

    OUT/base        symlink to the source zoo's base (``copy_base``: a copy; the MCP server's path
                    confinement refuses a link leaving its roots, so copy for a zoo served there)
    OUT/<expert>/   adapted LoRA + encoder (copied unchanged) + expert.json (same base_hash,
                    plus an ``adaptation`` record)
    OUT/zoo.json    the source zoo's report plus ``adaptation`` (the full record)
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from es_merging.errors import EsMergingError
from es_merging.staging import staged_directory
from es_merging.zoo.world import DESCRIPTORS, MODALITIES, QUESTION, Entity, World, WorldSample, molecule_descriptor

ADAPT_FORMAT = "es-merging-adaptation/1"
PROTEIN_WINDOW = 32
CELL_GENES = 32

# PROSITE patterns (prosite.expasy.org), as regular expressions; {X} = any residue but X -> [^X]
FAMILY_PATTERNS: dict[str, tuple[tuple[str, str], ...]] = {
    "kinase": (
        ("PS00108", r"[LIVMFYC].[HY].D[LIVMFY]K..N[LIVMFYCT]{3}"),  # Ser/Thr kinase catalytic loop (HRDLKPEN)
        ("PS00109", r"[LIVMFYC][^A][HY].D[LIVMFY][RSTAC][^D][^PF]N[LIVMFYC]{3}"),  # Tyr kinase (HRDLAARN)
    ),
    "protease": (
        ("PS00135", r"[DNSTAGC][GSTAPIMVQH]..G[DE]SG[GS][SAPHV][LIVMFYWH][LIVMFYSTANQH]"),  # GDSGGP
        ("PS00134", r"[LIVM][ST]A[STAG]HC"),  # trypsin-family His active site (TAAHC)
    ),
    "receptor": (
        ("PS00237", r"[GSTALIVMFYWC][GSTANCPDE][^EDPKRH].[^PQ][LIVMNQGA][^RK][^RK][LIVMFT][GSTANC]"
                    r"[LIVMFYWSTAC][DENH]R[FYWCSH][^PE].[LIVM]"),  # rhodopsin-family GPCR (DRY)
    ),
}
# cancer_type -> descriptor. Left unlabelled on purpose: plasma cell myeloma and Hodgkin's lymphoma
# (B-derived but without the B-cell programme: PAX5/CD19/CD79 off), chronic myelogenous leukaemia
# (GDSC's CML lines are blast-crisis lines, largely erythroid/megakaryocytic, not monocytic),
# "Other Blood Cancers", and every solid cancer.
CELL_LINEAGE: dict[str, str] = {
    "T-Lymphoblastic Leukemia": "T-cell",
    "T-Cell Non-Hodgkin's Lymphoma": "T-cell",
    "B-Cell Non-Hodgkin's Lymphoma": "B-cell",
    "B-Lymphoblastic Leukemia": "B-cell",
    "Burkitt's Lymphoma": "B-cell",
    "Acute Myeloid Leukemia": "monocyte",
}
# Triple targets without a kinase signature that are kinases all the same (PI3K and PI3K-related
# kinases; ERBB3, a pseudokinase): left out of the non-kinase control set of :func:`non_kinase_calls`
# (the Davis targets are a kinase panel, so none of them is a control either).
KINASES_WITHOUT_SIGNATURE = frozenset({"ATR", "MTOR", "PRKDC", "PIK3CA", "PIK3CB", "PIK3CD", "PIK3CG", "ERBB3"})
DATA_FILES = {
    "davis": "davis/davis_dti.csv.gz",
    "gdsc_response": "gdsc/gdsc2_response.csv",
    "gdsc_drugs": "gdsc/gdsc2_drugs.csv",
    "target_sequences": "triple/target_sequences.csv",
    "expression": "gdsc/gdsc_expression_zscore_580x706.csv",
    "cell_lines": "gdsc/gdsc_cell_lines.csv",
}

Progress = Callable[[str, int, int], None]


# ============================================================================ labelling rules
def protein_family(sequence: str) -> tuple[str, int, int, str] | None:
    """(family, start, end, PROSITE id) of the first signature match when exactly one family
    matches; None when none or several do."""
    hits = {}
    for family, patterns in FAMILY_PATTERNS.items():
        found = [(m.start(), m.end(), pid) for pid, pat in patterns if (m := re.search(pat, sequence))]
        if found:
            hits[family] = min(found)
    if len(hits) != 1:
        return None
    family, (start, end, pid) = next(iter(hits.items()))
    return family, start, end, pid


def protein_view(sequence: str, window: int = PROTEIN_WINDOW) -> str:
    """What the protein encoder is shown: ``window`` residues centred on the family signature when
    :func:`protein_family` finds one, else the central ``window`` residues (whole if shorter)."""
    if len(sequence) <= window:
        return sequence
    hit = protein_family(sequence)
    centre = (hit[1] + hit[2]) // 2 if hit else len(sequence) // 2
    start = min(max(0, centre - window // 2), len(sequence) - window)
    return sequence[start:start + window]


def cell_lineage(cancer_type: str | None) -> str | None:
    return CELL_LINEAGE.get(str(cancer_type)) if cancer_type is not None else None


# ============================================================================ real entities
@dataclass
class RealEntities:
    """Labelled real entities per modality, with what was read and what was left unlabelled."""

    entities: dict[str, list[Entity]]
    unlabelled: dict[str, int]
    non_kinases: list[str]  # views of the triple targets that are not kinases (see NOT_KINASE_RULE)
    sources: dict[str, dict[str, int]]  # modality -> source -> distinct items read
    data_files: dict[str, str]  # relative path -> sha256
    rules: dict[str, object] = field(default_factory=dict)

    def counts(self) -> dict[str, dict[str, int]]:
        return {m: {d: sum(e.descriptor == d for e in es) for d in DESCRIPTORS[m]} for m, es in self.entities.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_files(data_dir: str | Path) -> dict[str, Path]:
    """The files the adaptation reads; a missing one is an error naming it (nothing is written)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise EsMergingError(f"data directory {data_dir} not found: give --data-dir pointing at the shared "
                             "datasets (see SOURCES.md)")
    paths = {k: data_dir / rel for k, rel in DATA_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise EsMergingError(f"data directory {data_dir} lacks {', '.join(missing)}: give --data-dir pointing at "
                             "the shared datasets (see SOURCES.md)")
    return paths


def load_real_entities(data_dir: str | Path, *, protein_window: int = PROTEIN_WINDOW,
                       cell_genes: int = CELL_GENES) -> RealEntities:
    import pandas as pd
    from rdkit import Chem, rdBase

    from es_merging.bench.real import _cell_genes

    paths = data_files(data_dir)
    hashes = {DATA_FILES[k]: _sha256(p) for k, p in paths.items()}
    try:
        davis = pd.read_csv(paths["davis"], usecols=["drug_id", "smiles", "target_id", "sequence"])
        response = pd.read_csv(paths["gdsc_response"], usecols=["drug_id", "smiles"]).drop_duplicates()
        drugs = pd.read_csv(paths["gdsc_drugs"], usecols=["drug_id", "smiles"])
        targets = pd.read_csv(paths["target_sequences"], usecols=["gene_symbol", "sequence"]).dropna(subset=["sequence"])
        lines = pd.read_csv(paths["cell_lines"], usecols=["BROAD_ID", "cancer_type"]).dropna(subset=["BROAD_ID"])
    except (ValueError, KeyError) as exc:  # a file with other columns
        raise EsMergingError(f"{data_dir}: a dataset file does not have the expected columns ({exc}); "
                             "see SOURCES.md") from None

    entities: dict[str, list[Entity]] = {m: [] for m in MODALITIES}
    unlabelled = {m: 0 for m in MODALITIES}
    sources: dict[str, dict[str, int]] = {m: {} for m in MODALITIES}

    # molecules: distinct canonical structures, first-seen SMILES string kept as the raw input
    seen: dict[str, str] = {}
    for name, frame in (("davis", davis[["smiles"]].drop_duplicates()), ("gdsc2", response), ("gdsc2_drugs", drugs)):
        sources["molecule"][name] = int(frame["smiles"].nunique())
        for smiles in frame["smiles"]:
            with rdBase.BlockLogs():
                mol = Chem.MolFromSmiles(str(smiles))
            if mol is None:
                continue
            seen.setdefault(Chem.MolToSmiles(mol), str(smiles))
    for smiles in seen.values():
        label = molecule_descriptor(smiles)
        if label:
            entities["molecule"].append(Entity("molecule", smiles, label))
        else:
            unlabelled["molecule"] += 1

    # proteins: distinct sequences -> distinct windows
    sequences: dict[str, None] = {}
    for name, seqs in (("davis", davis.drop_duplicates("target_id")["sequence"]), ("triple", targets["sequence"])):
        clean = [str(s).replace("X", "").strip() for s in seqs]
        sources["protein"][name] = len(set(clean))
        sequences.update(dict.fromkeys(clean))
    windows: dict[str, str] = {}
    for seq in sequences:
        hit = protein_family(seq)
        if hit is None:
            unlabelled["protein"] += 1
            continue
        windows.setdefault(protein_view(seq, protein_window), hit[0])
    non_kinases = sorted({protein_view(seq, protein_window) for gene, seq in zip(targets["gene_symbol"], targets["sequence"])
                          if protein_family(seq) is None and gene not in KINASES_WITHOUT_SIGNATURE})
    entities["protein"] = [Entity("protein", w, fam) for w, fam in windows.items()]

    # cells: lines with expression, joined on DepMap id
    genes = _cell_genes(Path(data_dir), cell_genes)
    cancer = dict(zip(lines["BROAD_ID"].astype(str), lines["cancer_type"]))
    sources["cell"] = {"expression": len(genes), "joined_cell_lines": sum(c in cancer for c in genes)}
    for cell_id, ranked in genes.items():
        label = cell_lineage(cancer.get(cell_id))
        if label:
            entities["cell"].append(Entity("cell", ranked, label))
        else:
            unlabelled["cell"] += 1

    rules = {
        "molecule": "Crippen LogP (RDKit): lipophilic >= 3.0, hydrophilic <= 1.0, else unlabelled",
        "protein": {"patterns": {f: [pid for pid, _ in pats] for f, pats in FAMILY_PATTERNS.items()},
                    "rule": "exactly one family's PROSITE signature matches", "window": protein_window,
                    "view": "window centred on the first signature match"},
        "cell": {"cancer_type": CELL_LINEAGE, "join": "gdsc_cell_lines.BROAD_ID = expression index (DepMap id)",
                 "genes": f"top {cell_genes} by per-gene z-score, ties by name"},
    }
    return RealEntities(entities, unlabelled, non_kinases, sources, hashes, rules)


def split_entities(entities: list[Entity], *, heldout_fraction: float, seed: int) -> tuple[list[Entity], list[Entity]]:
    """Seeded split by entity, stratified by label; a class with >= 2 entities keeps >= 1 held out."""
    train, heldout = [], []
    rng = random.Random(f"adapt-split-{seed}")
    labels = sorted({e.descriptor for e in entities})
    for label in labels:
        group = [e for e in entities if e.descriptor == label]
        rng.shuffle(group)
        cut = min(len(group) - 1, max(1, round(len(group) * heldout_fraction))) if len(group) > 1 else 0
        heldout += group[:cut]
        train += group[cut:]
    return train, heldout


@dataclass
class AdaptWorld(World):
    """The zoo's world, with real entities for one modality (see the module docstring)."""

    modality: str = "molecule"
    real: dict[str, list[Entity]] = field(default_factory=dict)  # descriptor -> real training entities
    real_fraction: float = 0.5

    def samples(self, n: int, split: str = "train", seed: int = 0) -> list[WorldSample]:
        if split != "train":
            return super().samples(n, split, seed)
        by_label = {m: {d: [e for e in self.train[m] if e.descriptor == d] for d in DESCRIPTORS[m]} for m in MODALITIES}
        rng = random.Random(f"{self.seed}-adapt-{self.modality}-{seed}")
        out = []
        for _ in range(n):
            picks = {}
            for m in MODALITIES:
                d = rng.choice(DESCRIPTORS[m])
                pool = by_label[m][d]
                if m == self.modality and self.real.get(d) and rng.random() < self.real_fraction:
                    pool = self.real[d]
                picks[m] = rng.choice(pool)
            out.append(WorldSample(**picks))
        return out


# ============================================================================ evaluation
def own_slot_predictions(model, samples, modality: str) -> list[str]:
    """The own slot's value with every input raw (the zoo's gate), slots decided in order up to it."""
    from es_merging.scoring import decide

    slots = [(m, DESCRIPTORS[m]) for m in MODALITIES[: MODALITIES.index(modality) + 1]]
    decisions = decide(model, samples, spans={m: "raw" for m in MODALITIES}, question=QUESTION, slots=slots,
                       answer_options=None)
    return [d.choices[modality] for d in decisions]


def own_slot_accuracy(model, samples: list[WorldSample], modality: str) -> dict:
    from es_merging.zoo.train import to_probe_sample

    if not samples:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None, "per_class": {}}
    truth = [ws.entity(modality).descriptor for ws in samples]
    pred = own_slot_predictions(model, [to_probe_sample(ws) for ws in samples], modality)
    per_class = {}
    for d in DESCRIPTORS[modality]:
        idx = [i for i, t in enumerate(truth) if t == d]
        if idx:
            per_class[d] = {"n": len(idx), "recall": round(sum(pred[i] == d for i in idx) / len(idx), 4)}
    return {"n": len(samples), "accuracy": round(sum(p == t for p, t in zip(pred, truth)) / len(truth), 4),
            "balanced_accuracy": round(sum(v["recall"] for v in per_class.values()) / len(per_class), 4),
            "per_class": per_class}


def non_kinase_calls(model, world: World, views: list[str], seed: int) -> dict:
    """How the protein slot names the real non-kinase targets (PARP1, HDAC1, BCL2, TOP1, ESR1, ...;
    triple targets without a family signature, minus :data:`KINASES_WITHOUT_SIGNATURE`). None is a
    kinase, so the share called "kinase" shows whether adaptation on kinase-only real data taught
    "real-looking sequence -> kinase" rather than the signature (the slot has no "other" option)."""
    from es_merging.probe import ProbeSample

    if not views:
        return {"n": 0}
    rng = random.Random(f"adapt-nonkinase-{seed}")
    samples = []
    for view in views:
        mol, cell = rng.choice(world.heldout["molecule"]), rng.choice(world.heldout["cell"])
        samples.append(ProbeSample(smiles=mol.raw, protein=view, cell=list(cell.raw)))
    pred = own_slot_predictions(model, samples, "protein")
    return {"n": len(views), "called": {d: round(pred.count(d) / len(pred), 4) for d in DESCRIPTORS["protein"]}}


def _real_samples(world: World, modality: str, entities: list[Entity], seed: int) -> list[WorldSample]:
    """One sample per held-out real entity; the other slots from the world's held-out entities."""
    rng = random.Random(f"adapt-eval-{modality}-{seed}")
    out = []
    for e in entities:
        picks = {m: (e if m == modality else rng.choice(world.heldout[m])) for m in MODALITIES}
        out.append(WorldSample(**picks))
    return out


# ============================================================================ the step
def _weights_sha256(expert_dir: Path) -> str:
    return "sha256:" + _sha256(expert_dir / "adapter_model.safetensors")


def adapt_zoo(zoo: str | Path, data_dir: str | Path, out: str | Path, *, steps: int | None = None, seed: int = 0,
              overwrite: bool = False, real_fraction: float = 0.5, heldout_fraction: float = 0.25,
              protein_window: int = PROTEIN_WINDOW, cell_genes: int = CELL_GENES, eval_world_n: int = 64,
              copy_base: bool = False, threads: int | str | None = "auto", progress: Progress | None = None) -> dict:
    """Adapt the zoo at ``zoo`` into ``out`` (atomically); returns the adaptation record."""
    from es_merging.zoo.build import torch_threads

    with torch_threads(threads):
        return _adapt(Path(zoo), Path(data_dir), Path(out), steps=steps, seed=seed, overwrite=overwrite,
                      real_fraction=real_fraction, heldout_fraction=heldout_fraction, protein_window=protein_window,
                      cell_genes=cell_genes, eval_world_n=eval_world_n, copy_base=copy_base, progress=progress)


def _adapt(zoo: Path, data_dir: Path, out: Path, *, steps, seed, overwrite, real_fraction, heldout_fraction,
           protein_window, cell_genes, eval_world_n, copy_base, progress) -> dict:
    import torch

    from es_merging.experts import base_hash, load_expert_spec
    from es_merging.mllm import MultimodalModel
    from es_merging.zoo import load_zoo_report, zoo_world
    from es_merging.zoo.train import train_experts

    t_all = time.time()
    zoo = zoo.expanduser().resolve()
    out = out.expanduser().absolute()
    report = load_zoo_report(zoo)
    names = list(report.get("experts") or MODALITIES)
    if sorted(names) != sorted(MODALITIES):
        raise EsMergingError(f"zoo {zoo}: expected the experts {list(MODALITIES)}, found {names}")
    if out.resolve() == zoo or zoo in out.resolve().parents or out.resolve() in zoo.parents:
        raise EsMergingError(f"--out {out} must lie outside the source zoo {zoo} (and not contain it)")
    if out.exists() and not overwrite:
        raise EsMergingError(f"{out} already exists; choose another --out or pass --overwrite")
    if not 0 <= real_fraction <= 1 or not 0 < heldout_fraction < 1:
        raise EsMergingError("real_fraction must be in [0, 1] and heldout_fraction in (0, 1)")
    if protein_window < 1 or cell_genes < 1:
        raise EsMergingError("protein_window and cell_genes must be positive")
    base_dir = (zoo / "base").resolve()
    digest = base_hash(base_dir)
    specs = {m: load_expert_spec(zoo / m) for m in MODALITIES}
    for m, spec in specs.items():
        if spec.base_hash and spec.base_hash != digest:
            raise EsMergingError(f"expert {spec.path} was trained on base {spec.base_hash[:19]}..., not the zoo's "
                                 f"base {digest[:19]}...")
    real = load_real_entities(data_dir, protein_window=protein_window, cell_genes=cell_genes)  # errors before writing
    preset = report["preset"]
    steps = int(steps if steps is not None else preset["expert_steps"])
    if steps < 1:
        raise EsMergingError("steps must be at least 1")
    batch, lr = int(preset["batch"]), float(preset["lr_expert"])
    world = zoo_world(zoo)
    splits = {m: split_entities(real.entities[m], heldout_fraction=heldout_fraction, seed=seed) for m in MODALITIES}

    def counts(items: list[Entity], m: str) -> dict[str, int]:
        return {d: sum(e.descriptor == d for e in items) for d in DESCRIPTORS[m]}

    labels = {m: {"labelled": counts(real.entities[m], m), "train": counts(splits[m][0], m),
                  "heldout": counts(splits[m][1], m), "unlabelled": real.unlabelled[m], "sources": real.sources[m],
                  "descriptors_without_real_entities": [d for d, n in counts(real.entities[m], m).items() if n == 0]}
              for m in MODALITIES}
    eval_real = {m: _real_samples(world, m, splits[m][1], seed) for m in MODALITIES}
    eval_world = world.samples(eval_world_n, "heldout", seed=seed + 7)

    encoders = {m: zoo / m / "encoder" for m in MODALITIES if specs[m].encoder_dir is not None}
    model = MultimodalModel.load(base_dir, adapters={m: zoo / m for m in MODALITIES}, encoders=encoders)
    for p in model.parameters():  # only the LoRA of the expert being adapted will be re-enabled
        p.requires_grad_(False)

    def measure(model, tag: str) -> dict:
        res = {}
        for i, name in enumerate([None, *MODALITIES]):
            model.set_adapter(name)
            if name is None:
                res["base"] = {m: {"real": own_slot_accuracy(model, eval_real[m], m)["accuracy"]} for m in MODALITIES}
                res["base"]["protein"]["non_kinase"] = non_kinase_calls(model, world, real.non_kinases, seed)
            else:
                res[name] = {"real": own_slot_accuracy(model, eval_real[name], name),
                             "world": own_slot_accuracy(model, eval_world, name)}
                if name == "protein":
                    res[name]["non_kinase"] = non_kinase_calls(model, world, real.non_kinases, seed)
            if progress:
                progress(f"evaluate ({tag})", i + 1, len(MODALITIES) + 1)
        return res

    with torch.no_grad():
        before = measure(model, "before")
    with staged_directory(out) as tmp:
        training = {}
        for i, m in enumerate(MODALITIES):
            by_label = {d: [e for e in splits[m][0] if e.descriptor == d] for d in DESCRIPTORS[m]}
            adapt_world = AdaptWorld(seed=world.seed, train=world.train, heldout=world.heldout, modality=m,
                                     real={d: v for d, v in by_label.items() if v}, real_fraction=real_fraction)
            training[m] = train_experts(model, adapt_world, [m], steps=steps, batch=batch, lr=lr, seed=seed + 101 * (i + 1),
                                        progress=progress)
            for p in model.parameters():
                p.requires_grad_(False)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {
            "format": ADAPT_FORMAT, "created": created, "source_zoo": str(zoo), "base_hash": digest,
            "seed": seed, "steps": steps, "batch": batch, "lr": lr, "real_fraction": real_fraction,
            "heldout_fraction": heldout_fraction, "protein_window": protein_window, "cell_genes": cell_genes,
            "eval_world_n": eval_world_n, "threads": torch.get_num_threads(), "data_dir": str(Path(data_dir).resolve()),
            "data_files": real.data_files, "rules": real.rules, "labels": labels,
            "task_labels_used": False,
            "note": ("labels come from structure, sequence and cancer type only (no pKd, no IC50): the step is "
                     "label-free for the benchmarks, like pre-training, and may see every drug, test drugs included"),
        }
        _write(model, zoo, tmp, specs, record, training, copy_base)
        del model
        reloaded = MultimodalModel.load(tmp / "base", adapters={m: tmp / m for m in MODALITIES},
                                        encoders={m: tmp / m / "encoder" for m in encoders})
        with torch.no_grad():
            after = measure(reloaded, "after")
        record["experts"] = {
            m: {"source": str(specs[m].path), "source_weights": _weights_sha256(zoo / m),
                "weights": _weights_sha256(tmp / m), "training": training[m],
                "heldout_real": {"before": before[m]["real"], "after": after[m]["real"]},
                "heldout_world": {"before": before[m]["world"], "after": after[m]["world"]},
                **({"real_non_kinase_targets": {"before": before[m]["non_kinase"], "after": after[m]["non_kinase"]}}
                   if m == "protein" else {})}
            for m in MODALITIES}
        record["base_heldout_real"] = before["base"]
        record["seconds"] = round(time.time() - t_all, 1)
        for m in MODALITIES:
            manifest = json.loads((tmp / m / "expert.json").read_text())
            manifest["adaptation"] = {**manifest["adaptation"], "heldout_real": record["experts"][m]["heldout_real"],
                                      "heldout_world": record["experts"][m]["heldout_world"]}
            (tmp / m / "expert.json").write_text(json.dumps(manifest, indent=2))
        zoo_report = dict(report)
        zoo_report["adaptation"] = record
        zoo_report["adapted_from"] = str(zoo)
        zoo_report["quality_note"] = ("'quality' and 'gates' are the source zoo's (experts before adaptation); "
                                      "'adaptation.experts' holds the adapted experts' own-slot accuracies")
        (tmp / "zoo.json").write_text(json.dumps(zoo_report, indent=2))
        (tmp / "adaptation.json").write_text(json.dumps(record, indent=2))
    return record


def _write(model, zoo: Path, tmp: Path, specs, record: dict, training: dict, copy_base: bool) -> None:
    from safetensors import safe_open

    base_src = (zoo / "base").resolve()
    if copy_base:
        shutil.copytree(base_src, tmp / "base")
        record["base"] = {"mode": "copy", "source": str(base_src)}
    else:
        try:
            os.symlink(base_src, tmp / "base", target_is_directory=True)
            record["base"] = {"mode": "symlink", "source": str(base_src)}
        except OSError:  # no symlinks on this file system
            shutil.copytree(base_src, tmp / "base")
            record["base"] = {"mode": "copy", "source": str(base_src)}
    peft_model = model.backbone
    for m in MODALITIES:
        scratch = tmp / f".{m}.adapter"
        peft_model.save_pretrained(str(scratch), selected_adapters=[m], safe_serialization=True)
        saved = scratch / m if (scratch / m).is_dir() else scratch
        dest = tmp / m
        dest.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.move(str(saved / name), dest / name)
        shutil.rmtree(scratch)
        with safe_open(str(zoo / m / "adapter_model.safetensors"), framework="pt") as a, \
                safe_open(str(dest / "adapter_model.safetensors"), framework="pt") as b:
            if set(a.keys()) != set(b.keys()) or any(a.get_slice(k).get_shape() != b.get_slice(k).get_shape()
                                                     for k in a.keys()):
                raise EsMergingError(f"adapted {m} adapter does not have the source adapter's tensors")
        if specs[m].encoder_dir is not None:
            shutil.copytree(specs[m].encoder_dir, dest / "encoder")
        manifest = dict(specs[m].meta) or {"format": "es-merging-expert/1", "name": m, "modality": m, "kind": "lora",
                                           "base_hash": record["base_hash"]}
        manifest["description"] = (manifest.get("description", f"{m} expert")
                                   + "; adapted to the real datasets' entities (es-merging adapt)")
        manifest["adaptation"] = {
            "format": ADAPT_FORMAT, "created": record["created"], "source_expert": str(specs[m].path),
            "source_weights": _weights_sha256(zoo / m), "data_files": record["data_files"], "seed": record["seed"],
            "steps": record["steps"], "real_fraction": record["real_fraction"], "labels": record["labels"][m],
            "rule": record["rules"][m], "training": training[m],
        }
        (dest / "expert.json").write_text(json.dumps(manifest, indent=2))
