"""Prediction: a task is a question template plus answer options; the model scores each option's
log-likelihood after the prompt and a softmax over the options gives one probability per option
(DESIGN section 6). Nothing is parsed from free text, so there is no invalid output.

A task may first let the model fill descriptor *slots* by constrained greedy decoding (the embedded
world's "state each entity's descriptors, then answer" protocol); the answer is then scored after
"Final answer:". Optional k labelled support examples, retrieved by similarity (Tanimoto on Morgan
fingerprints, global sequence identity, top-gene Jaccard; the mean over the query's modalities),
are put in front of the query as earlier chat turns.

One code path for every model: the base (adapters off), a single expert, a task-specific model or a
merged model from :func:`es_merging.load_model`: anything with the :class:`MultimodalModel`
interface (``renderer``, ``backbone``, ``encoders``).

How it is computed (and why it is fast): per batch of samples the prompt is run once with a
key/value cache; each decision step then runs only the option tokens (and the text that follows
them) on top of that cache, the cache rows are expanded per option and the chosen option's row is
kept. Sequences are right-padded with explicit position ids and attention masks, so padding never
changes a score (the tests compare a sample scored alone with the same sample in a batch, and with
:func:`es_merging.scoring.score_targets`, which re-runs whole sequences). Encoder outputs are cached
per distinct input by the model. Samples are sorted by prompt length inside a call, to pad little.
"""
from __future__ import annotations

import csv
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from es_merging.errors import EsMergingError, InvalidInputError, ProbeError
from es_merging.probe import MODALITY_ORDER, PLACEHOLDERS, ProbeSample, response_segments

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
DEFAULT_BATCH_SIZE = 32
MAX_K = 16


# ============================================================================ tasks
class Task(BaseModel):
    """A question template plus answer options (and optional slots filled before the answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    question: str
    options: tuple[str, ...] = Field(min_length=2, max_length=32)
    modalities: tuple[str, ...] = Field(description="modalities every sample must have")
    optional_modalities: tuple[str, ...] = Field((), description="modalities used when given")
    slots: tuple[tuple[str, tuple[str, ...]], ...] = Field(
        (), description="(slot name, options) filled in order by constrained greedy decoding before the answer")
    positive: str | None = Field(None, description="the option screens rank by default (first option if None)")
    normalize: Literal["sum", "mean"] = Field("sum", description="option score: sum or per-token mean log-prob")
    spans: dict[str, Literal["raw", "text"]] = Field(default_factory=dict, description="modality -> raw|text")

    @model_validator(mode="after")
    def _check(self) -> "Task":
        if len(set(self.options)) != len(self.options):
            raise ValueError(f"task {self.name!r}: options must be distinct, got {self.options}")
        for m in (*self.modalities, *self.optional_modalities):
            if m not in MODALITY_ORDER:
                raise ValueError(f"task {self.name!r}: unknown modality {m!r}; known: {MODALITY_ORDER}")
        if self.positive is not None and self.positive not in self.options:
            raise ValueError(f"task {self.name!r}: positive {self.positive!r} is not one of {self.options}")
        for name, opts in self.slots:
            if len(opts) < 2 or len(set(opts)) != len(opts):
                raise ValueError(f"task {self.name!r}: slot {name!r} needs >= 2 distinct options")
        return self

    @property
    def positive_option(self) -> str:
        return self.positive or self.options[0]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "question": self.question,
                "options": list(self.options), "modalities": list(self.modalities),
                "optional_modalities": list(self.optional_modalities),
                "slots": {n: list(o) for n, o in self.slots}, "positive": self.positive_option}


def _builtin_tasks() -> dict[str, Task]:
    from es_merging.zoo.world import ANSWERS, DESCRIPTORS, MODALITIES, QUESTION

    return {
        "dti": Task(
            name="dti", description="drug-target interaction (Davis: pKd >= 7 interacts)",
            question="Does the drug interact with the target protein?",
            options=("Interacts", "Does not interact"), modalities=("molecule", "protein"),
            optional_modalities=("cell",)),
        "drug_response": Task(
            name="drug_response", description="cell-line drug response (GDSC2: below the drug's median ln IC50 = sensitive)",
            question="Is the cell sensitive or resistant to the drug?",
            options=("Sensitive", "Resistant"), modalities=("molecule", "cell"), optional_modalities=("protein",)),
        "triple_effect": Task(
            name="triple_effect", description="effect of a drug acting on its target in a cell (three levels)",
            question="How strongly does the drug act on the target in this cell?",
            options=("Strong effect", "Weak effect", "No effect"), modalities=("molecule", "protein", "cell")),
        "embedded": Task(
            name="embedded", description="the embedded world's interactive rule: describe each entity, then answer",
            question=QUESTION, options=tuple(ANSWERS), modalities=tuple(MODALITIES),
            slots=tuple((m, tuple(DESCRIPTORS[m])) for m in MODALITIES), positive="Yes"),
    }


@lru_cache(maxsize=1)
def _tasks() -> dict[str, Task]:
    return _builtin_tasks()


def task_names() -> list[str]:
    return list(_tasks())


def get_task(name: str | Task) -> Task:
    if isinstance(name, Task):
        return name
    tasks = _tasks()
    if name not in tasks:
        raise EsMergingError(f"unknown task {name!r}; built-in tasks: {', '.join(tasks)}")
    return tasks[name]


# ============================================================================ results
class Prediction(BaseModel):
    """One sample's answer: a probability per option (they sum to 1) and the chosen option."""

    model_config = ConfigDict(extra="forbid")

    index: int
    id: str | None = None
    ok: bool = True
    error: str | None = None
    task: str
    probabilities: dict[str, float] = Field(default_factory=dict)
    log_likelihoods: dict[str, float] = Field(default_factory=dict, description="option score before the softmax")
    choice: str | None = None
    slots: dict[str, str] = Field(default_factory=dict, description="slot -> chosen value (tasks with slots)")
    slot_probabilities: dict[str, dict[str, float]] = Field(default_factory=dict)
    support_ids: list[str] = Field(default_factory=list, description="support examples put in the prompt")


# ============================================================================ validation
def _as_sample(item: ProbeSample | dict[str, Any], index: int) -> ProbeSample:
    if isinstance(item, ProbeSample):
        return item
    if not isinstance(item, dict):
        raise InvalidInputError(item, "expected a sample (smiles / protein / cell)", index=index)
    data = dict(item)
    if isinstance(data.get("cell"), str):
        data["cell"] = [g.strip() for g in data["cell"].split(",") if g.strip()]
    try:
        return ProbeSample.model_validate(data)
    except ValueError as exc:
        raise InvalidInputError(item, f"not a valid sample ({exc.errors()[0]['msg'] if hasattr(exc, 'errors') else exc})",
                                index=index) from None


class _Validator:
    """Validates each distinct raw input once with the modality modules (errors quote the item)."""

    def __init__(self, model, protein_policy: str = "replace"):
        self.protein_policy = protein_policy
        enc = getattr(model, "encoders", {})
        self.protein_max = getattr(enc["protein"], "max_length", None) if "protein" in enc else None
        self.cache: dict[tuple[str, Any], Any] = {}

    def molecule(self, smiles: str) -> str:
        key = ("molecule", smiles)
        if key not in self.cache:
            from rdkit import Chem

            from es_merging.modalities.molecule import parse_molecule

            try:
                self.cache[key] = Chem.MolToSmiles(parse_molecule(smiles))
            except InvalidInputError as exc:
                self.cache[key] = exc
        return self._get(key)

    def protein(self, seq: str) -> str:
        key = ("protein", seq)
        if key not in self.cache:
            from es_merging.modalities.protein import parse_protein

            try:
                out = parse_protein(seq, policy=self.protein_policy).sequence
                if self.protein_max is not None and len(out) > self.protein_max:
                    raise InvalidInputError(seq, f"protein of {len(out)} residues exceeds the protein encoder's "
                                                 f"limit of {self.protein_max}", hint="crop it to a domain")
                self.cache[key] = out
            except InvalidInputError as exc:
                self.cache[key] = exc
        return self._get(key)

    def cell(self, genes: Sequence[str]) -> list[str]:
        key = ("cell", tuple(genes))
        if key not in self.cache:
            from es_merging.modalities.cell import cell_from_ranked

            try:
                self.cache[key] = list(cell_from_ranked(list(genes)).genes)
            except InvalidInputError as exc:
                self.cache[key] = exc
        return self._get(key)

    def _get(self, key):
        value = self.cache[key]
        if isinstance(value, InvalidInputError):
            raise value
        return value

    def sample(self, sample: ProbeSample, task: Task) -> ProbeSample:
        spans = task.spans
        missing = [m for m in task.modalities if not sample.raw(m) and m not in sample.descriptors]
        if missing:
            raise InvalidInputError(sample.id or "sample", f"task {task.name!r} needs {', '.join(missing)}",
                                    hint=f"give {' and '.join(_FLAG[m] for m in missing)}")
        allowed = set(task.modalities) | set(task.optional_modalities)
        update: dict[str, Any] = {}
        for m in MODALITY_ORDER:
            raw = sample.raw(m)
            if m not in allowed:
                if raw or m in sample.descriptors:  # silently ignored inputs would mislead: drop them visibly
                    update[_FIELD[m]] = None
                continue
            if not raw or spans.get(m) == "text":
                continue
            try:
                update[_FIELD[m]] = {"molecule": self.molecule, "protein": self.protein, "cell": self.cell}[m](raw)
            except InvalidInputError as exc:
                raise InvalidInputError(exc.item, f"{m}: {exc.reason}", exc.hint) from None
        out = sample.model_copy(update=update)
        if any(k in update and update[k] is None for k in _FIELD.values()):
            out = out.model_copy(update={"descriptors": {k: v for k, v in out.descriptors.items() if k in allowed}})
        return out


_FIELD = {"molecule": "smiles", "protein": "protein", "cell": "cell"}
_FLAG = {"molecule": "--smiles", "protein": "--protein", "cell": "--cell"}


# ============================================================================ support (k-shot)
def load_support(path: str | Path) -> list[ProbeSample]:
    """Labelled support examples from a CSV/TSV with columns among ``smiles``, ``protein``, ``cell``
    (comma-separated ranked genes), a ``label`` column (or ``answer``) and an optional ``id``."""
    path = Path(path)
    if not path.is_file():
        raise EsMergingError(f"support file {path} does not exist")
    with path.open(newline="") as fh:
        head = fh.readline()
        fh.seek(0)
        delimiter = "\t" if head.count("\t") > head.count(",") else ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        label_col = columns.get("label") or columns.get("answer")
        if label_col is None:
            raise EsMergingError(f"support file {path}: no 'label' column (found {list(columns)})")
        if not any(c in columns for c in ("smiles", "protein", "cell")):
            raise EsMergingError(f"support file {path}: no smiles, protein or cell column (found {list(columns)})")
        out = []
        for line_no, row in enumerate(reader, start=2):
            label = (row.get(label_col) or "").strip()
            if not label:
                raise EsMergingError(f"support file {path}, line {line_no}: empty label")
            item: dict[str, Any] = {"answer": label}
            for col in ("smiles", "protein", "cell"):
                value = (row.get(columns[col]) or "").strip() if col in columns else ""
                if value:
                    item[col] = [g.strip() for g in value.split(",") if g.strip()] if col == "cell" else value
            ident = (row.get(columns["id"]) or "").strip() if "id" in columns else ""
            item["id"] = ident or f"line{line_no}"
            out.append(ProbeSample.model_validate(item))
    if not out:
        raise EsMergingError(f"support file {path} has no rows")
    return out


class SupportSet:
    """Labelled examples indexed for similarity retrieval.

    Similarity of a query to an example: the mean, over the query's modalities, of Tanimoto on
    Morgan fingerprints (radius 2, 2048 bits), global sequence identity, and Jaccard of the top-50
    genes; a modality the example lacks counts 0. Ties go to the earlier example."""

    def __init__(self, samples: Sequence[ProbeSample | dict[str, Any]], *, gene_k: int = 50):
        from es_merging.modalities.molecule import morgan_fingerprints

        validator = _Validator(None)
        self.samples: list[ProbeSample] = []
        for i, raw in enumerate(samples):
            s = _as_sample(raw, i)
            if not s.answer:
                raise EsMergingError(f"support example {i} ({s.id}) has no label")
            try:
                upd = {}
                if s.smiles:
                    upd["smiles"] = validator.molecule(s.smiles)
                if s.protein:
                    upd["protein"] = validator.protein(s.protein)
                if s.cell:
                    upd["cell"] = validator.cell(s.cell)
            except InvalidInputError as exc:
                raise EsMergingError(f"support example {i} ({s.id}): {exc}") from None
            self.samples.append(s.model_copy(update={**upd, "id": s.id or f"support{i}"}))
        self.gene_k = gene_k
        n = len(self.samples)
        self.has_mol = np.array([bool(s.smiles) for s in self.samples])
        self.fps = np.zeros((n, 2048), dtype=np.float32)
        if self.has_mol.any():
            idx = np.flatnonzero(self.has_mol)
            self.fps[idx] = morgan_fingerprints([self.samples[i].smiles for i in idx], radius=2, n_bits=2048)
        self.gene_sets = [set(s.cell[:gene_k]) if s.cell else None for s in self.samples]
        self._identity: dict[tuple[str, str], float] = {}
        self._fp_cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[str]:
        return [s.answer for s in self.samples]  # type: ignore[misc]

    def _mol_sim(self, smiles: str) -> np.ndarray:
        from es_merging.modalities.molecule import morgan_fingerprint, tanimoto_matrix

        fp = self._fp_cache.get(smiles)
        if fp is None:
            fp = morgan_fingerprint(smiles, radius=2, n_bits=2048).astype(np.float32)
            if len(self._fp_cache) < 100_000:
                self._fp_cache[smiles] = fp
        sim = tanimoto_matrix(fp[None, :], self.fps)[0].astype(np.float64)
        return np.where(self.has_mol, sim, 0.0)

    def _identity_of(self, a: str, b: str) -> float:
        key = (a, b) if a <= b else (b, a)
        hit = self._identity.get(key)
        if hit is None:
            from es_merging.modalities.protein import sequence_identity

            hit = sequence_identity(a, b)
            if len(self._identity) < 1_000_000:
                self._identity[key] = hit
        return hit

    def similarity(self, sample: ProbeSample) -> np.ndarray:
        parts = []
        if sample.smiles:
            parts.append(self._mol_sim(sample.smiles))
        if sample.protein:
            parts.append(np.array([self._identity_of(sample.protein, s.protein) if s.protein else 0.0
                                   for s in self.samples]))
        if sample.cell:
            q = set(sample.cell[: self.gene_k])
            parts.append(np.array([len(q & g) / len(q | g) if g is not None and (q | g) else 0.0
                                   for g in self.gene_sets]))
        if not parts:
            return np.zeros(len(self.samples))
        return np.mean(parts, axis=0)

    def nearest(self, sample: ProbeSample, k: int) -> list[int]:
        """Indices of the k most similar examples, most similar first (stable on ties)."""
        if k <= 0 or not self.samples:
            return []
        sim = self.similarity(sample)
        order = np.argsort(-sim, kind="stable")
        return [int(i) for i in order[:k]]


# ============================================================================ rendering
@dataclass
class _Prompt:
    ids: list[int]
    soft: list[tuple[str, Any, int]]  # (modality, raw input, start of its placeholder run)
    support_ids: list[str] = field(default_factory=list)


def _piece(model, sample: ProbeSample, task: Task, response: list[tuple[str, str]] | None):
    rendered = model.renderer.render(sample, spans=dict(task.spans), question=task.question, response=response)
    soft = []
    for m, raw in rendered.soft_inputs.items():
        start = rendered.masks[m].index(True)
        soft.append((m, raw, start))
    return rendered, soft


def build_prompt(model, sample: ProbeSample, task: Task, support: Sequence[ProbeSample] = ()) -> _Prompt:
    """Token ids of the prompt (support examples as earlier chat turns, then the query), ending
    where the assistant's reply starts; slots and options are appended by the scorer."""
    renderer = model.renderer
    bos = model.tokenizer.bos_token_id
    newline = renderer.ids("\n")
    ids: list[int] = []
    soft: list[tuple[str, Any, int]] = []
    for ex in support:
        slots = [(m, ex.descriptors[m]) for m, _ in task.slots if m in ex.descriptors]
        if len(slots) != len(task.slots):
            slots = []
        rendered, ex_soft = _piece(model, ex, task, response_segments(slots, ex.answer))
        piece = rendered.input_ids
        drop = 1 if ids and bos is not None and piece and piece[0] == bos else 0
        offset = len(ids) - drop
        ids += piece[drop:] + newline
        soft += [(m, raw, s + offset) for m, raw, s in ex_soft]
    rendered, q_soft = _piece(model, sample, task, None)
    piece = rendered.input_ids
    drop = 1 if ids and bos is not None and piece and piece[0] == bos else 0
    offset = len(ids) - drop
    ids += piece[drop:]
    soft += [(m, raw, s + offset) for m, raw, s in q_soft]
    return _Prompt(ids, soft, [ex.id or "" for ex in support])


# ============================================================================ scoring engine
def _steps(task: Task) -> list[tuple[str, list[str], list[str]]]:
    """Decision steps: (name, options, connector texts before the options). The connector texts
    and options are exactly the segments of :func:`es_merging.probe.response_segments`, tokenized
    segment by segment as the renderer does."""
    steps = []
    for i, (name, options) in enumerate(task.slots):
        steps.append((name, list(options), [("" if i == 0 else ";") + f" {name}:"]))
    steps.append(("answer", list(task.options), [(". " if task.slots else "") + "Final answer:"]))
    return steps


class _Scorer:
    def __init__(self, model, task: Task):
        self.model = model
        self.task = task
        r = model.renderer
        self.steps = []
        for name, options, conn in _steps(task):
            conn_ids = [t for text in conn for t in r.ids(text)]
            opt_ids = [r.ids(" " + o) for o in options]
            if any(not o for o in opt_ids):
                raise EsMergingError(f"task {task.name!r}: an option of {name!r} tokenizes to nothing")
            self.steps.append((name, options, conn_ids, opt_ids))
        self.pad = model.tokenizer.pad_token_id or 0

    # -- model calls
    def _embed(self, ids: torch.Tensor, soft: list[list[tuple[str, Any, int]]]) -> torch.Tensor:
        model = self.model
        embeds = model.backbone.get_input_embeddings()(ids)
        by_mod: dict[str, list[Any]] = {}
        for row in soft:
            for m, raw, _ in row:
                by_mod.setdefault(m, []).append(raw)
        if not by_mod:
            return embeds
        embeds = embeds.clone()
        vecs = {}
        for m, raws in by_mod.items():
            if m not in model.encoders:
                raise EsMergingError(f"raw {m} input but the model has no {m} encoder")
            vecs[m] = model._soft_tokens(m, raws, use_cache=True)
        for i, row in enumerate(soft):
            for m, raw, start in row:
                v = vecs[m][tuple(raw) if isinstance(raw, list) else raw].to(embeds.dtype)
                embeds[i, start:start + v.shape[0]] = v
        return embeds

    def _run(self, *, embeds=None, ids=None, attn, pos, cache, keep=None):
        kwargs = {"logits_to_keep": keep} if keep is not None else {}
        out = self.model.backbone(
            inputs_embeds=embeds, input_ids=ids, attention_mask=attn, position_ids=pos,
            cache=cache, use_cache=True, **kwargs)
        return torch.log_softmax(out.logits.float(), dim=-1), cache  # updated in place

    @torch.no_grad()
    def score(self, prompts: list[_Prompt], groups: list[tuple[list[int], int]] | None = None) -> list[dict[str, Any]]:
        """``groups``: (batch rows, shared prefix length) whose rows share their first tokens (a
        screen's drug and protein); each shared prefix is run once and its cache copied per row."""
        device = self.model.device
        B = len(prompts)
        seqs = [p.ids + self.steps[0][2] for p in prompts]  # the first connector is fixed text
        if groups and len(groups) < B:
            cache, attn, lens, last = self._prompt_shared(prompts, seqs, groups)
        else:
            cache, attn, lens, last = self._prompt_plain(prompts, seqs)
        results: list[dict[str, Any]] = [{"slots": {}, "slot_probabilities": {}} for _ in range(B)]
        for s, (name, options, _conn, opt_ids) in enumerate(self.steps):
            is_last = s == len(self.steps) - 1
            next_conn = [] if is_last else self.steps[s + 1][2]
            O = len(options)
            scores = torch.zeros((B, O), dtype=torch.float64)
            for o, toks in enumerate(opt_ids):
                scores[:, o] = last[:, toks[0]].double().cpu()
            multi = any(len(t) > 1 for t in opt_ids)
            if multi:
                # all options packed in ONE row per sample on top of the cache: block o = option o's
                # tokens (+ the next connector when the chosen block continues). A 4-D mask lets
                # block o see the sample's path so far and its own earlier tokens only; positions
                # restart at the path length for every block. No cache copy per option.
                blocks = [t + next_conn for t in opt_ids]
                starts = [sum(len(b) for b in blocks[:o]) for o in range(O)]
                Lp = sum(len(b) for b in blocks)
                packed = torch.tensor([t for b in blocks for t in b], dtype=torch.long, device=device)
                own = torch.zeros((Lp, Lp), dtype=torch.bool)
                offsets = torch.zeros(Lp, dtype=torch.long)
                for o, b in enumerate(blocks):
                    a, e = starts[o], starts[o] + len(b)
                    own[a:e, a:e] = torch.ones((len(b), len(b)), dtype=torch.bool).tril()
                    offsets[a:e] = torch.arange(len(b))
                T = attn.shape[1]
                mask4 = torch.cat([attn.bool()[:, None, None, :].expand(B, 1, Lp, T),
                                   own.to(device)[None, None].expand(B, 1, Lp, Lp)], dim=-1)
                pos_x = (lens[:, None] + offsets[None, :]).to(device)
                lp, cache = self._run(ids=packed[None].expand(B, Lp), attn=mask4, pos=pos_x, cache=cache)
                for o, toks in enumerate(opt_ids):
                    if len(toks) > 1:
                        tail = torch.tensor(toks[1:], device=device)
                        idx = torch.arange(starts[o], starts[o] + len(toks) - 1, device=device)
                        got = lp[:, idx, :].gather(-1, tail[None, :, None].expand(B, -1, 1)).squeeze(-1)
                        scores[:, o] += got.double().sum(-1).cpu()
            final = scores / torch.tensor([len(t) for t in opt_ids], dtype=torch.float64) \
                if self.task.normalize == "mean" else scores
            probs = torch.softmax(final, dim=-1)
            best = torch.argmax(final, dim=-1)
            for i in range(B):
                p = {o: float(probs[i, k]) for k, o in enumerate(options)}
                if is_last:
                    results[i]["probabilities"] = p
                    results[i]["log_likelihoods"] = {o: float(final[i, k]) for k, o in enumerate(options)}
                    results[i]["choice"] = options[int(best[i])]
                else:
                    results[i]["slots"][name] = options[int(best[i])]
                    results[i]["slot_probabilities"][name] = p
            if is_last:
                break
            chosen_conts = [opt_ids[int(best[i])] + next_conn for i in range(B)]
            if multi:
                # keep the chosen block in the path, mask the others out for every later token
                keep = torch.zeros((B, Lp), dtype=attn.dtype)
                ends = torch.zeros(B, dtype=torch.long)
                for i in range(B):
                    o = int(best[i])
                    keep[i, starts[o]:starts[o] + len(blocks[o])] = 1
                    ends[i] = starts[o] + len(blocks[o]) - 1
                attn = torch.cat([attn, keep.to(device)], dim=1)
                last = lp[torch.arange(B, device=device), ends.to(device)]
                lens = lens + torch.tensor([len(blocks[int(best[i])]) for i in range(B)])
            else:
                # single-token options: scored from the cached logits; run only the chosen ones
                L = max(len(c) for c in chosen_conts)
                cont = torch.full((B, L), self.pad, dtype=torch.long)
                cmask = torch.zeros((B, L), dtype=torch.long)
                for i, c in enumerate(chosen_conts):
                    cont[i, : len(c)] = torch.tensor(c)
                    cmask[i, : len(c)] = 1
                attn = torch.cat([attn, cmask.to(device)], dim=1)
                pos_c = (lens[:, None] + torch.arange(L)[None, :]).to(device)
                lp, cache = self._run(ids=cont.to(device), attn=attn, pos=pos_c, cache=cache)
                clen = torch.tensor([len(c) for c in chosen_conts])
                last = lp[torch.arange(B, device=device), (clen - 1).to(device)]
                lens = lens + clen
        return results

    def _pad(self, rows: list[list[int]]):
        lens = torch.tensor([len(r) for r in rows])
        W = int(lens.max())
        ids = torch.full((len(rows), W), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        attn = (torch.arange(W)[None, :] < lens[:, None]).long()
        return ids, attn, lens

    def _prompt_plain(self, prompts, seqs):
        from transformers import DynamicCache

        device = self.model.device
        ids, attn, lens = self._pad(seqs)
        ids, attn = ids.to(device), attn.to(device)
        pos = torch.arange(ids.shape[1], device=device)[None, :].expand(ids.shape[0], -1)
        embeds = self._embed(ids, [p.soft for p in prompts])
        # logits only where they are read: each row's last real position
        keep, where = torch.unique(lens - 1, return_inverse=True)
        logp, cache = self._run(embeds=embeds, attn=attn, pos=pos, cache=DynamicCache(), keep=keep.to(device))
        last = logp[torch.arange(len(seqs), device=device), where.to(device)]  # [B, V] next-token log-probs
        return cache, attn, lens, last

    def _prompt_shared(self, prompts, seqs, groups):
        from transformers import DynamicCache

        device = self.model.device
        B = len(seqs)
        row_group = torch.zeros(B, dtype=torch.long)
        shared = torch.zeros(B, dtype=torch.long)
        for g, (rows, n) in enumerate(groups):
            row_group[rows] = g
            shared[rows] = n
        # 1. each group's shared prefix once
        heads = [seqs[rows[0]][:n] for rows, n in groups]
        pids, pmask, plens = self._pad(heads)
        psoft = [[(m, raw, st) for m, raw, st in prompts[rows[0]].soft if st < n] for rows, n in groups]
        pids, pmask = pids.to(device), pmask.to(device)
        pos = torch.arange(pids.shape[1], device=device)[None, :].expand(len(groups), -1)
        cache = DynamicCache()
        self._run(embeds=self._embed(pids, psoft), attn=pmask, pos=pos, cache=cache, keep=1)
        # 2. one copy of its cache per row, then every row's own rest on top
        cache.batch_select_indices(row_group.to(device))
        tails = [seqs[i][int(shared[i]):] for i in range(B)]
        sids, smask, slens = self._pad(tails)
        ssoft = [[(m, raw, st - int(shared[i])) for m, raw, st in prompts[i].soft if st >= int(shared[i])]
                 for i in range(B)]
        sids, smask = sids.to(device), smask.to(device)
        attn = torch.cat([pmask[row_group.to(device)], smask], dim=1)
        pos = (shared[:, None] + torch.arange(sids.shape[1])[None, :]).to(device)
        keep, where = torch.unique(slens - 1, return_inverse=True)
        logp, cache = self._run(embeds=self._embed(sids, ssoft), attn=attn, pos=pos, cache=cache, keep=keep.to(device))
        last = logp[torch.arange(B, device=device), where.to(device)]
        return cache, attn, shared + slens, last


# ============================================================================ shared prefixes
MIN_SHARED = 16  # tokens: shorter common prefixes are not worth a separate forward


def _identity(p: _Prompt) -> tuple:
    """The prompt as comparable items: token ids, and soft tokens as (modality, input) so that two
    prompts share a prefix only where their embeddings are identical too."""
    ident: list[tuple] = [(0, t) for t in p.ids]
    for m, raw, start in p.soft:
        key = (1, m, ",".join(raw) if isinstance(raw, (list, tuple)) else str(raw))
        pid = p.ids[start]
        j = start
        while j < len(p.ids) and p.ids[j] == pid:
            ident[j] = key
            j += 1
    return tuple(ident)


def _lcp(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _groups(idents: list[tuple], lengths: list[int]) -> list[tuple[list[int], int]]:
    """Cut rows (in identity order) into runs sharing a prefix, maximising the tokens saved,
    sum over runs of (size - 1) x shared length, by dynamic programming over the cut points."""
    n = len(idents)
    neighbour = [0] + [_lcp(idents[j - 1], idents[j]) for j in range(1, n)]
    best = [0] * (n + 1)  # best[j]: the most tokens saved by rows[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], j - 1  # row j-1 alone
        shared = lengths[j - 1] - 1
        for i in range(j - 2, -1, -1):  # run rows[i:j]
            shared = min(shared, neighbour[i + 1], lengths[i] - 1)
            if shared < MIN_SHARED:
                break
            gain = best[i] + (j - 1 - i) * shared
            if gain > best[j]:
                best[j], cut[j] = gain, i
    runs = []
    j = n
    while j > 0:
        i = cut[j]
        shared = min([lengths[k] - 1 for k in range(i, j)] + [neighbour[k] for k in range(i + 1, j)])
        runs.append((list(range(i, j)), shared))
        j = i
    return runs[::-1]


def _plan_batches(prompts: list[tuple[int, _Prompt]], batch_size: int, extra: int):
    """Order and cut the prompts into batches. When consecutive prompts (in identity order) share
    a quarter or more of their tokens, as a screen's rows do, each batch carries groups of rows
    with a common prefix; otherwise prompts are sorted by length (least padding) and not grouped."""
    if not prompts:
        return []
    idents = {i: _identity(p) for i, p in prompts}
    by_ident = sorted(prompts, key=lambda ip: idents[ip[0]])
    shared = sum(_lcp(idents[a[0]], idents[b[0]]) for a, b in zip(by_ident, by_ident[1:]))
    total = sum(len(p.ids) for _, p in prompts)
    batches = []
    if shared < 0.25 * total:
        ordered = sorted(prompts, key=lambda ip: len(ip[1].ids))
        return [(ordered[s:s + batch_size], None) for s in range(0, len(ordered), batch_size)]
    for s in range(0, len(by_ident), batch_size):
        chunk = by_ident[s:s + batch_size]
        batches.append((chunk, _groups([idents[i] for i, _ in chunk], [len(p.ids) + extra for _, p in chunk])))
    return batches


# ============================================================================ adapter fusion
FUSE_LIMIT_BYTES = 1 << 30


@contextmanager
def fused_adapter(model, enabled: bool | None = None):
    """Inside the block, the active LoRA adapter is folded into the base weights (W + s * B @ A)
    and the adapter layers are off: one matmul per module instead of three, about a quarter less
    time on the tiny zoo. The original weight tensors are kept and put back afterwards (exactly,
    not by subtracting), also on error. ``enabled=None``: only for plain LoRA adapters (no DoRA)
    whose targeted weights take under 1 GiB (the copy costs that much memory)."""
    if enabled is False:
        yield False
        return
    active = getattr(model, "active_adapter", None)
    backbone = getattr(model, "backbone", None)
    layers = []
    if active is not None and hasattr(backbone, "base_model"):
        from peft.tuners.lora import LoraLayer

        for mod in backbone.modules():
            if isinstance(mod, LoraLayer) and active in getattr(mod, "lora_A", {}):
                if mod.use_dora.get(active) or getattr(mod, "merged", False) or not hasattr(mod.get_base_layer(), "weight"):
                    layers = []
                    break
                layers.append(mod)
    size = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size() for m in layers)
    if not layers or (enabled is None and size > FUSE_LIMIT_BYTES):
        yield False
        return
    saved = []
    try:
        with torch.no_grad():
            for mod in layers:
                base = mod.get_base_layer()
                original = base.weight.data
                saved.append((base, original))
                base.weight.data = original + mod.get_delta_weight(active).to(original.dtype)
        backbone.base_model.disable_adapter_layers()
        yield True
    finally:
        for base, original in saved:
            base.weight.data = original
        model.set_adapter(active)


# ============================================================================ public API
def predict(
    model,
    samples: Iterable[ProbeSample | dict[str, Any]],
    task: str | Task,
    *,
    support: SupportSet | Sequence[ProbeSample | dict[str, Any]] | None = None,
    k: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    protein_policy: str = "replace",
    fuse: bool | None = None,
    share_prefixes: bool = True,
) -> list[Prediction]:
    """Score ``task``'s options for every sample with ``model`` (whatever adapter it has active).

    Invalid samples come back as ``Prediction(ok=False, error=...)``; the others are unaffected.
    ``k`` > 0 puts the k most similar ``support`` examples (labelled with ``task``'s options) in
    front of each query. ``fuse``: see :func:`fused_adapter` (None = automatic).
    ``share_prefixes``: run a prefix common to several rows (a screen's drug and protein) once."""
    task = get_task(task)
    if batch_size < 1:
        raise EsMergingError("batch_size must be >= 1")
    if not 0 <= k <= MAX_K:
        raise EsMergingError(f"k={k} must be between 0 and {MAX_K}")
    if k and not support:
        raise EsMergingError("k-shot prediction needs labelled support examples (--support FILE)")
    for m in task.modalities:
        if m in PLACEHOLDERS and task.spans.get(m, "raw") == "raw" and m not in model.encoders:
            raise EsMergingError(f"task {task.name!r} feeds raw {m} input but the model has no {m} encoder")
    sup: SupportSet | None = None
    if k:
        sup = support if isinstance(support, SupportSet) else SupportSet(support)  # type: ignore[arg-type]
        bad = sorted({s.answer for s in sup.samples if s.answer not in task.options})
        if bad:
            raise EsMergingError(f"support labels {bad} are not options of task {task.name!r} {list(task.options)}")
    items = list(samples)
    validator = _Validator(model, protein_policy)
    out: list[Prediction | None] = [None] * len(items)
    prompts: list[tuple[int, _Prompt]] = []
    for i, item in enumerate(items):
        ident = item.id if isinstance(item, ProbeSample) else (item.get("id") if isinstance(item, dict) else None)
        try:
            sample = validator.sample(_as_sample(item, i), task)
            chosen = [sup.samples[j] for j in sup.nearest(sample, k)] if sup is not None else []
            prompts.append((i, build_prompt(model, sample, task, chosen)))
        except (InvalidInputError, ProbeError) as exc:
            out[i] = Prediction(index=i, id=ident, ok=False, error=str(exc), task=task.name)
    scorer = _Scorer(model, task)
    done = len(items) - len(prompts)
    if progress:
        progress("predict", done, len(items))
    with fused_adapter(model, fuse if prompts else False):
        for chunk, groups in _plan_batches(prompts, batch_size, len(scorer.steps[0][2])):
            results = scorer.score([p for _, p in chunk], groups if share_prefixes else None)
            for (i, p), r in zip(chunk, results):
                item = items[i]
                ident = item.id if isinstance(item, ProbeSample) else (item.get("id") if isinstance(item, dict) else None)
                out[i] = Prediction(index=i, id=ident, task=task.name, support_ids=p.support_ids, **r)
            done += len(chunk)
            if progress:
                progress("predict", done, len(items))
    return out  # type: ignore[return-value]


@torch.no_grad()
def features(model, samples: Sequence[ProbeSample | dict[str, Any]], task: str | Task, *,
             pool: Literal["mean", "last"] = "mean", layer: int = -1, batch_size: int = DEFAULT_BATCH_SIZE,
             protein_policy: str = "replace") -> tuple[np.ndarray, list[str | None]]:
    """Frozen-model features of each sample's prompt (the task's question, no answer): the hidden
    state of ``layer`` (default the last), mean-pooled over the prompt tokens or taken at the last
    one. Returns ``(float32[N, hidden], errors)``; an invalid sample's row is zero and its error
    says why (the others are unaffected)."""
    task = get_task(task)
    validator = _Validator(model, protein_policy)
    items = list(samples)
    errors: list[str | None] = [None] * len(items)
    prompts: list[tuple[int, _Prompt]] = []
    for i, item in enumerate(items):
        try:
            prompts.append((i, build_prompt(model, validator.sample(_as_sample(item, i), task), task)))
        except (InvalidInputError, ProbeError) as exc:
            errors[i] = str(exc)
    hidden = int(model.config.hidden_size)
    out = np.zeros((len(items), hidden), dtype=np.float32)
    scorer = _Scorer(model, task)
    device = model.device
    prompts.sort(key=lambda ip: len(ip[1].ids))
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        lens = torch.tensor([len(p.ids) for _, p in chunk])
        W = int(lens.max())
        ids = torch.full((len(chunk), W), scorer.pad, dtype=torch.long)
        for r, (_, p) in enumerate(chunk):
            ids[r, : len(p.ids)] = torch.tensor(p.ids)
        mask = (torch.arange(W)[None, :] < lens[:, None])
        embeds = scorer._embed(ids.to(device), [p.soft for _, p in chunk])
        res = model.backbone(inputs_embeds=embeds, attention_mask=mask.long().to(device), use_cache=False,
                             output_hidden_states=True, logits_to_keep=1)
        h = res.hidden_states[layer].float()
        if pool == "mean":
            m = mask.to(device)[:, :, None].float()
            vec = (h * m).sum(1) / m.sum(1)
        else:
            vec = h[torch.arange(len(chunk), device=device), (lens - 1).to(device)]
        for r, (i, _) in enumerate(chunk):
            out[i] = vec[r].cpu().numpy()
    return out, errors


def load_zoo_model(zoo_dir: str | Path, expert: str | None = "base", *, experts: Sequence[str] | None = None):
    """A zoo model with every expert's adapter attached and every encoder loaded; ``expert``
    ("base" or None = adapters off, or an expert's name) is the active one."""
    from es_merging.mllm import MultimodalModel
    from es_merging.zoo import load_zoo_report

    zoo_dir = Path(zoo_dir)
    report = load_zoo_report(zoo_dir)
    names = list(experts or report.get("experts", {}) or MODALITY_ORDER)
    if expert not in (None, "base") and expert not in names:
        raise EsMergingError(f"zoo {zoo_dir} has no expert {expert!r}; experts: {', '.join(names)} (or 'base')")
    model = MultimodalModel.load(
        zoo_dir / "base",
        adapters={n: zoo_dir / n for n in names},
        encoders={n: zoo_dir / n / "encoder" for n in names if (zoo_dir / n / "encoder" / "config.json").exists()},
    )
    model.set_adapter(None if expert in (None, "base") else expert)
    return model


def load_predictor(path: str | Path | None = None, *, zoo: str | Path | None = None, expert: str | None = None):
    """``path``: a merged-model directory (``es_merging.load_model``); or ``zoo`` + ``expert``."""
    if zoo is not None:
        if path is not None:
            raise EsMergingError("give either a model directory or --zoo DIR --expert NAME, not both")
        return load_zoo_model(zoo, expert or "base")
    if path is None:
        raise EsMergingError("no model: give --model DIR (a merged model) or --zoo DIR --expert NAME|base")
    path = Path(path)
    if (path / "zoo.json").exists():
        return load_zoo_model(path, expert or "base")
    from es_merging import load_model

    return load_model(path)


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (rank statistic, ties averaged); NaN when one class is absent."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_f1(pred: Sequence[str], true: Sequence[str], classes: Sequence[str]) -> float:
    scores = []
    for c in classes:
        tp = sum(p == c and t == c for p, t in zip(pred, true))
        fp = sum(p == c and t != c for p, t in zip(pred, true))
        fn = sum(p != c and t == c for p, t in zip(pred, true))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(sum(scores) / len(scores)) if scores else math.nan
