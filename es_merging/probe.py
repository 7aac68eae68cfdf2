"""Probes: N samples (drug, protein, cell), rendered into one chat prompt with one span per
modality and boolean token masks.

Every model (base and experts) sees the SAME rendered ids; the soft tokens for placeholder spans
come from the owning expert's encoder. Prompt layout (paper style)::

    Molecule: <mol> x 8
    Protein: <prot> x (len + 2)
    Cell: G1, G2, ... (top-k genes)
    Question: ...

A span can also be rendered as text (the entity's descriptor word), which is how the base model
learns to reason and how "given the true descriptors" is evaluated.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from es_merging.errors import EsMergingError, ProbeError

PROBE_FORMAT = "es-merging-probe/1"
MODALITY_ORDER = ("molecule", "protein", "cell")
MODALITY_LABELS = {"molecule": "Molecule", "protein": "Protein", "cell": "Cell"}
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
PLACEHOLDERS = {"molecule": "<mol>", "protein": "<prot>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_QUESTION = "Does the drug act on the target in this cell?"
DEFAULT_CELL_TOP_K = 16
MAX_PROBE_SAMPLES = 100_000

SpanKind = Literal["raw", "text"]


class ProbeSample(BaseModel):
    """One (drug, protein, cell) sample; any modality may be absent."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    smiles: str | None = None
    protein: str | None = None
    cell: list[str] | None = Field(None, description="ranked gene symbols, most expressed first")
    descriptors: dict[str, str] = Field(default_factory=dict, description="known textual descriptors per modality")
    answer: str | None = None

    def raw(self, modality: str) -> Any:
        return {"molecule": self.smiles, "protein": self.protein, "cell": self.cell}[modality]

    def modalities(self) -> list[str]:
        return [m for m in MODALITY_ORDER if self.raw(m)]


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = PROBE_FORMAT
    samples: list[ProbeSample]
    strategy: str = "given"
    seed: int | None = None
    source: str = "explicit"
    meta: dict[str, Any] = Field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """Hash of the samples only (not of how they were chosen), so equal probes compare equal."""
        payload = json.dumps([s.model_dump() for s in self.samples], sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()

    def modalities(self) -> list[str]:
        return [m for m in MODALITY_ORDER if any(s.raw(m) for s in self.samples)]

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.samples),
            "modalities": self.modalities(),
            "strategy": self.strategy,
            "seed": self.seed,
            "source": self.source,
            "hash": self.content_hash,
            "skipped": len(self.meta.get("skipped", [])),
        }

    def save(self, path: str | Path) -> Path:
        """Atomic write: a crash never leaves a half-written probe."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.model_dump()
        data["hash"] = self.content_hash
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Probe":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ProbeError(f"probe file {path} does not exist; build one with `es-merging probe build`") from None
        except OSError as exc:  # a directory, no permission...
            raise ProbeError(f"probe file {path} cannot be read ({exc.strerror or exc})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ProbeError(f"probe file {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT:
            raise ProbeError(f"probe file {path}: expected \"format\": \"{PROBE_FORMAT}\"")
        stored = data.pop("hash", None)
        if not isinstance(stored, str) or not stored:
            raise ProbeError(f"probe file {path} has no content \"hash\" (every probe es-merging writes has "
                             "one); rebuild it with `es-merging probe build` (from a table: --table FILE.csv)")
        try:
            probe = cls.model_validate(data)
        except ValueError as exc:
            raise ProbeError(f"probe file {path}: {exc}") from None
        if stored != probe.content_hash:
            raise ProbeError(f"probe file {path}: content hash mismatch (edited by hand?); rebuild it")
        return probe


# ----------------------------------------------------------------------------- building


def _validate_sample(sample: ProbeSample, index: int, protein_policy: str) -> ProbeSample:
    """Validate each present modality with the modality modules; returns a normalised copy."""
    from es_merging.modalities.cell import cell_from_ranked
    from es_merging.modalities.molecule import describe_molecule, parse_molecule
    from es_merging.modalities.protein import parse_protein

    update: dict[str, Any] = {}
    if sample.smiles is not None:
        mol = parse_molecule(sample.smiles)
        update["smiles"] = describe_molecule(mol)["canonical_smiles"]
    if sample.protein is not None:
        update["protein"] = parse_protein(sample.protein, policy=protein_policy).sequence
    if sample.cell is not None:
        update["cell"] = list(cell_from_ranked(sample.cell).genes)
    if not (update or sample.descriptors):
        raise ProbeError(f"probe sample {index} has no modality; give at least one of smiles, protein, cell")
    return sample.model_copy(update=update)


def _select(samples: list[ProbeSample], n: int | None, strategy: str, seed: int) -> list[ProbeSample]:
    if n is None or n >= len(samples):
        return samples
    if strategy == "random":
        rng = random.Random(seed)
        return [samples[i] for i in sorted(rng.sample(range(len(samples)), n))]
    if strategy == "diverse":
        return _maxmin_by_molecule(samples, n, seed)
    raise ProbeError(f"unknown sampling strategy {strategy!r}; use 'random' or 'diverse'")


def _maxmin_by_molecule(samples: list[ProbeSample], n: int, seed: int) -> list[ProbeSample]:
    """RDKit MaxMin picking on Morgan fingerprints of the drugs (seeded)."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    from rdkit.SimDivFilters.rdSimDivPickers import MaxMinPicker

    from es_merging.modalities.molecule import parse_molecule

    if any(s.smiles is None for s in samples):
        raise ProbeError("strategy 'diverse' picks by drug fingerprints: every sample needs a smiles")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(parse_molecule(s.smiles)) for s in samples]

    def distance(i: int, j: int) -> float:
        return 1.0 - DataStructs.TanimotoSimilarity(fps[i], fps[j])

    picked = MaxMinPicker().LazyPick(distance, len(fps), n, seed=seed)
    return [samples[i] for i in sorted(picked)]


def build_probe(
    samples: Iterable[ProbeSample | dict[str, Any]],
    *,
    n: int | None = None,
    strategy: str = "random",
    seed: int = 0,
    source: str = "explicit",
    protein_policy: str = "replace",
    skip_invalid: bool = False,
) -> Probe:
    """Validate, then choose ``n`` samples by ``strategy``. Invalid samples are an error that lists
    them (index and reason), or are skipped and recorded in ``meta['skipped']`` with skip_invalid."""
    if n is not None and not 1 <= n <= MAX_PROBE_SAMPLES:
        raise ProbeError(f"probe size n={n} must be between 1 and {MAX_PROBE_SAMPLES}")
    valid: list[ProbeSample] = []
    skipped: list[dict[str, Any]] = []
    for index, raw in enumerate(samples):
        try:
            sample = raw if isinstance(raw, ProbeSample) else ProbeSample.model_validate(raw)
            valid.append(_validate_sample(sample, index, protein_policy))
        except (EsMergingError, ValueError) as exc:
            item_id = raw.id if isinstance(raw, ProbeSample) else raw.get("id") if isinstance(raw, dict) else None
            skipped.append({"index": index, "id": item_id, "error": str(exc)})
        if index >= MAX_PROBE_SAMPLES * 10:
            raise ProbeError(f"more than {MAX_PROBE_SAMPLES * 10} candidate samples; pre-filter the table")
    if skipped and not skip_invalid:
        shown = "; ".join(f"sample {s['index']}" + (f" ({s['id']})" if s["id"] else "") + f": {s['error']}"
                          for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise ProbeError(f"{len(skipped)} invalid probe sample(s): {shown}{more}. Fix them or pass skip_invalid")
    if not valid:
        raise ProbeError("no valid samples to build a probe from")
    chosen = _select(valid, n, strategy, seed)
    return Probe(samples=chosen, strategy=strategy, seed=seed, source=source, meta={"skipped": skipped})


def samples_from_lists(
    smiles: Sequence[str] = (),
    proteins: Sequence[str] = (),
    cells: Sequence[Sequence[str] | str] = (),
    *,
    pairing: str = "zip",
    n: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Pair lists into samples: ``zip`` (equal lengths) or seeded ``random`` pairing (n samples)."""
    lists = {"smiles": list(smiles), "protein": list(proteins), "cell": [_genes(c) for c in cells]}
    present = {k: v for k, v in lists.items() if v}
    if not present:
        raise ProbeError("give at least one non-empty list of smiles, proteins or cells")
    if pairing == "zip":
        lengths = {k: len(v) for k, v in present.items()}
        if len(set(lengths.values())) != 1:
            raise ProbeError(f"pairing 'zip' needs equal list lengths, got {lengths}; use pairing 'random'")
        count = next(iter(lengths.values()))
        return [{k: v[i] for k, v in present.items()} for i in range(count)]
    if pairing == "random":
        if n is None:
            raise ProbeError("pairing 'random' needs n, the number of samples to draw")
        rng = random.Random(seed)
        return [{k: rng.choice(v) for k, v in present.items()} for _ in range(n)]
    raise ProbeError(f"unknown pairing {pairing!r}; use 'zip' or 'random'")


def _genes(cell: Sequence[str] | str) -> list[str]:
    if isinstance(cell, str):
        return [g.strip() for g in cell.split(",") if g.strip()]
    return list(cell)


def samples_from_table(path: str | Path) -> list[dict[str, Any]]:
    """CSV/TSV with columns among ``smiles``, ``protein``, ``cell`` (comma-separated ranked genes)
    and optional ``id``."""
    path = Path(path)
    if not path.is_file():
        raise ProbeError(f"table {path} does not exist")
    try:
        return _read_table(path)
    except UnicodeDecodeError as exc:
        raise ProbeError(f"table {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _read_table(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: spreadsheet exports start with a byte-order mark that would hide the first column
    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
        fh.seek(0)
        if not header.strip():
            raise ProbeError(f"table {path} is empty; its first line must name the columns smiles, protein, cell")
        # decide by the header only: the cell column's gene lists hold commas in a TSV too
        delimiter = "\t" if header.count("\t") > header.count(",") else ","
        reader = csv.DictReader(fh, delimiter=delimiter)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        wanted = [c for c in ("smiles", "protein", "cell") if c in columns]
        if not wanted:
            raise ProbeError(f"table {path}: no column named smiles, protein or cell (found {list(columns)})")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            item: dict[str, Any] = {}
            for col in wanted:
                value = (row.get(columns[col]) or "").strip()
                if value:
                    item[col] = _genes(value) if col == "cell" else value
            if "id" in columns and row.get(columns["id"]):
                item["id"] = row[columns["id"]]
            else:
                item["id"] = f"row{line_no}"
            rows.append(item)
    return rows


# ----------------------------------------------------------------------------- rendering


@dataclass
class RenderedPrompt:
    """Token ids of one prompt (and optional response) with exact per-modality masks."""

    input_ids: list[int]
    masks: dict[str, list[bool]]  # modality -> mask over input_ids covering exactly its span
    soft_inputs: dict[str, Any] = field(default_factory=dict)  # modality -> raw input for its encoder
    prompt_length: int = 0
    target_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (name, start, end) in ids


class PromptRenderer:
    """Renders samples segment by segment so that every span's token range is known exactly."""

    def __init__(self, tokenizer, soft_token_counts: dict[str, Any] | None = None,
                 cell_top_k: int = DEFAULT_CELL_TOP_K):
        self.tokenizer = tokenizer
        # modality -> callable(raw) -> number of soft tokens (the encoder decides)
        self.soft_token_counts = soft_token_counts or {}
        self.cell_top_k = cell_top_k
        sentinel = "\x00"
        if not getattr(tokenizer, "chat_template", None):
            raise ProbeError("the tokenizer has no chat template; prompts are rendered with it (use an instruct "
                             "model's tokenizer, or set tokenizer.chat_template)")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": sentinel}], tokenize=False, add_generation_prompt=True
        )
        self.prefix, _, self.suffix = rendered.partition(sentinel)
        self._cache: dict[str, list[int]] = {}
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in PLACEHOLDERS.items()}

    def ids(self, text: str) -> list[int]:
        hit = self._cache.get(text)
        if hit is None:
            hit = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._cache) < 4096:
                self._cache[text] = hit
        return list(hit)

    def span_ids(self, sample: ProbeSample, modality: str, kind: SpanKind) -> list[int]:
        # text spans carry their leading space so that words tokenize as they do mid-sentence
        if kind == "text":
            if modality not in sample.descriptors:
                raise ProbeError(f"sample {sample.id or ''} has no {modality} descriptor to render as text")
            return self.ids(" " + sample.descriptors[modality])
        raw = sample.raw(modality)
        if modality == "cell":
            return self.ids(" " + ", ".join(raw[: self.cell_top_k]))
        counter = self.soft_token_counts.get(modality)
        if counter is None:
            raise ProbeError(f"no encoder for modality {modality!r}: it cannot be rendered raw")
        return [self.placeholder_ids[modality]] * int(counter(raw))

    def render(
        self,
        sample: ProbeSample,
        *,
        spans: dict[str, SpanKind] | None = None,
        question: str = DEFAULT_QUESTION,
        response: list[tuple[str, str]] | None = None,
    ) -> RenderedPrompt:
        """``spans``: modality -> "raw" | "text" (default raw). ``response``: teacher-forced
        (segment_text, target_name) pairs appended after the prompt; target_name "" is context only."""
        spans = spans or {}
        ids = self.ids(self.prefix)
        masks: dict[str, list[bool]] = {}
        soft: dict[str, Any] = {}
        ranges: dict[str, tuple[int, int]] = {}
        present = [m for m in MODALITY_ORDER if sample.raw(m) or m in sample.descriptors]
        for i, modality in enumerate(present):
            kind = spans.get(modality, "raw")
            if kind == "raw" and not sample.raw(modality):
                kind = "text"
            sep = " " if kind == "raw" and modality in PLACEHOLDERS else ""
            ids += self.ids(("" if i == 0 else "\n") + f"{MODALITY_LABELS[modality]}:{sep}")
            span = self.span_ids(sample, modality, kind)
            if not span:
                raise ProbeError(f"sample {sample.id or ''}: the {modality} span is empty")
            ranges[modality] = (len(ids), len(ids) + len(span))
            ids += span
            if kind == "raw" and modality in PLACEHOLDERS:
                soft[modality] = sample.raw(modality)
        ids += self.ids(f"\nQuestion: {question}") + self.ids(self.suffix)
        prompt_length = len(ids)
        targets: list[tuple[str, int, int]] = []
        for text, name in response or []:
            seg = self.ids(text)
            if name:
                targets.append((name, len(ids), len(ids) + len(seg)))
            ids += seg
        for modality, (start, end) in ranges.items():
            mask = [False] * len(ids)
            mask[start:end] = [True] * (end - start)
            masks[modality] = mask
        return RenderedPrompt(ids, masks, soft, prompt_length, targets)


def response_segments(slots: list[tuple[str, str]], answer: str | None, eos: str | None = None) -> list[tuple[str, str]]:
    """The assistant's reply as segments: ``molecule: lipophilic; protein: kinase; cell: T-cell.
    Final answer: Yes``. Each value segment is a named target (``slot:<modality>``, ``answer``)."""
    segments: list[tuple[str, str]] = []
    for i, (modality, value) in enumerate(slots):
        segments.append((("" if i == 0 else ";") + f" {modality}:", ""))
        segments.append((" " + value, f"slot:{modality}"))
    if answer is not None:
        segments.append(((". " if slots else "") + "Final answer:", ""))
        segments.append((" " + answer, "answer"))
        if eos:
            segments.append((eos, ""))
    return segments
