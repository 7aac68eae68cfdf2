"""Protein sequences (Biopython): validate the alphabet, apply a declared policy to ambiguous
residues, describe with ProtParam, compare by global identity.

Biopython's ``ProteinAnalysis`` does not validate its input (a digit or ``J`` silently skews the
numbers or fails deep inside), so every sequence is checked here first and an error names the
1-based position and the character. Positions count residues after whitespace and newlines are
removed (FASTA line breaks do not shift them).

Residue classes
  standard   the 20 amino acids ``ACDEFGHIKLMNPQRSTVWY``: always accepted
  ambiguous  ``X`` (unknown), ``B`` (Asx: D or N), ``Z`` (Glx: E or Q), ``U`` (selenocysteine),
             ``O`` (pyrrolysine): handled by ``policy``
  invalid    anything else (``J``, digits, ``-``, ``.``, a ``*`` that is not the final character)

Policies for ambiguous residues
  ``keep``     the sequence keeps them; each is reported as a warning; descriptors are computed on
               the sequence with them removed (ProtParam has no values for them), and the result
               says so (``descriptors_on``)
  ``replace``  ``B->D``, ``Z->E``, ``U->C``, ``O->K`` (the closest standard residue: Asx/Glx resolve
               to their acid form, selenocysteine to cysteine, pyrrolysine to the lysine it derives
               from) and ``X`` is deleted; each change is reported as a warning
  ``reject``   any ambiguous residue is an error
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Literal

from Bio.SeqUtils.ProtParam import ProteinAnalysis

from es_merging.errors import InvalidInputError
from es_merging.modalities.base import ItemResult, check_batch, display, error_result

__all__ = [
    "STANDARD", "AMBIGUOUS", "REPLACEMENTS", "ProteinRecord", "split_fasta", "parse_fasta",
    "parse_protein", "describe_protein", "sequence_identity", "inspect_proteins",
]

Policy = Literal["keep", "replace", "reject"]
POLICIES = ("keep", "replace", "reject")
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS = "XBZUO"
REPLACEMENTS = {"B": "D", "Z": "E", "U": "C", "O": "K", "X": ""}

_WS = re.compile(r"\s+")
_INVALID = re.compile(f"[^{STANDARD}{AMBIGUOUS}]")
_AMBIG = re.compile(f"[{AMBIGUOUS}]")
_NON_STANDARD = re.compile(f"[^{STANDARD}]")
_REPLACE_TABLE = str.maketrans({k: v or None for k, v in REPLACEMENTS.items()})

# Composition groups reported by describe_protein (disjoint; they cover the 20 residues).
GROUPS = {
    "hydrophobic": "AVILMFWC",
    "polar": "STNQY",
    "positive": "KRH",
    "negative": "DE",
    "special": "GP",
}


@dataclass
class ProteinRecord:
    """One validated sequence. ``ambiguous`` holds (1-based position, letter) of the input's
    ambiguous residues (positions refer to the sequence before any replacement)."""

    id: str | None
    sequence: str
    ambiguous: list[tuple[int, str]] = field(default_factory=list)
    description: str | None = None
    policy: str = "keep"
    warnings: list[str] = field(default_factory=list)

    @property
    def standard_sequence(self) -> str:
        """The sequence restricted to the 20 standard residues (what ProtParam can describe)."""
        return _NON_STANDARD.sub("", self.sequence) if self.ambiguous else self.sequence


def split_fasta(text: str) -> list[str]:
    """Split FASTA text into one text per record (header line included), without validating the
    sequences, so that callers can validate each record on its own."""
    if not isinstance(text, str):
        raise InvalidInputError(text, f"expected FASTA text, got {type(text).__name__}")
    body = text.lstrip()
    if not body.startswith(">"):
        raise InvalidInputError(text, "not FASTA: the first non-blank line must start with '>'",
                                hint="or give the bare sequence")
    return [">" + chunk for chunk in body[1:].split("\n>")]


def _parse_one_fasta(chunk: str) -> tuple[str | None, str | None, str]:
    header, _, seq = chunk.lstrip()[1:].partition("\n")
    header = header.strip()
    rec_id, _, desc = header.partition(" ")
    return (rec_id or None), (desc.strip() or None), seq


def parse_protein(text: str, *, policy: Policy = "keep", min_length: int = 1, max_length: int = 5000) -> ProteinRecord:
    """Validate one protein given as a bare sequence or as FASTA text with exactly one record."""
    if not isinstance(text, str):
        raise InvalidInputError(text, f"expected a protein sequence string, got {type(text).__name__}")
    if policy not in POLICIES:
        raise InvalidInputError(policy, "unknown ambiguity policy", hint=f"one of {', '.join(POLICIES)}")
    rec_id = desc = None
    raw = text
    if text.lstrip().startswith(">"):
        chunks = split_fasta(text)
        if len(chunks) != 1:
            raise InvalidInputError(text, f"{len(chunks)} FASTA records in one item",
                                    hint="give one record per item, or use parse_fasta")
        rec_id, desc, raw = _parse_one_fasta(chunks[0])
    # Cheap guard before any per-character work on a huge input (whitespace allowed generously).
    if len(raw) > 2 * max_length + 1000:
        raise InvalidInputError(text, f"sequence too long: over {max_length} residues (max_length)",
                                hint="raise max_length if this is intended")
    seq = _WS.sub("", raw).upper()
    if seq.endswith("*"):  # a translated stop codon at the end is conventional, not an error
        seq = seq[:-1]
    if not seq:
        raise InvalidInputError(text, "empty sequence" + (f" in FASTA record {rec_id!r}" if rec_id else ""))
    bad = _INVALID.search(seq)
    if bad:
        pos, ch = bad.start() + 1, bad.group()
        n_bad = len(_INVALID.findall(seq))
        what = "a stop codon '*' inside the sequence" if ch == "*" else f"invalid residue {ch!r}"
        more = f" (and {n_bad - 1} more invalid characters)" if n_bad > 1 else ""
        hint = (f"allowed: the 20 standard residues {STANDARD} and ambiguous {AMBIGUOUS}" if ch != ">"
                else "FASTA text must start with its '>' header line")
        raise InvalidInputError(text, f"{what} at position {pos}{more}", hint=hint)
    ambiguous = [(m.start() + 1, m.group()) for m in _AMBIG.finditer(seq)]
    warnings: list[str] = []
    if ambiguous:
        listed = ", ".join(f"{ch}{pos}" for pos, ch in ambiguous[:10]) + (" ..." if len(ambiguous) > 10 else "")
        if policy == "reject":
            pos, ch = ambiguous[0]
            raise InvalidInputError(text, f"non-standard/ambiguous residue {ch!r} at position {pos} "
                                          f"({len(ambiguous)} in total: {listed})",
                                    hint="policy 'keep' or 'replace' accepts them")
        if policy == "replace":
            seq = seq.translate(_REPLACE_TABLE)
            warnings.append(f"{len(ambiguous)} non-standard/ambiguous residues replaced "
                            f"(B->D, Z->E, U->C, O->K, X deleted): {listed}")
        else:
            warnings.append(f"{len(ambiguous)} non-standard/ambiguous residues kept: {listed}; "
                            "descriptors computed on the sequence with them removed")
    if not seq:
        raise InvalidInputError(text, "no residue left after deleting the unknown residues X (policy 'replace')")
    if len(seq) < min_length:
        raise InvalidInputError(text, f"sequence too short: {len(seq)} residues < min_length={min_length}")
    if len(seq) > max_length:
        raise InvalidInputError(text, f"sequence too long: {len(seq)} residues > max_length={max_length}",
                                hint="raise max_length if this is intended")
    return ProteinRecord(rec_id, seq, ambiguous, desc, policy, warnings)


def parse_fasta(text: str, *, policy: Policy = "keep", min_length: int = 1, max_length: int = 5000) -> list[ProteinRecord]:
    """All records of a FASTA text; the first invalid record raises (its index is set).
    Use :func:`inspect_proteins` on :func:`split_fasta` to keep the valid ones."""
    records = []
    for i, chunk in enumerate(split_fasta(text)):
        try:
            records.append(parse_protein(chunk, policy=policy, min_length=min_length, max_length=max_length))
        except InvalidInputError as exc:
            raise InvalidInputError(display(chunk, 80), exc.reason, exc.hint, index=i) from None
    return records


def describe_protein(record: ProteinRecord) -> dict:
    """ProtParam descriptors, on ``record.standard_sequence`` (see the module docstring)."""
    seq = record.standard_sequence
    if not seq:
        raise InvalidInputError(record.sequence, "no standard residue left to describe",
                                hint="the sequence consists only of ambiguous residues")
    pa = ProteinAnalysis(seq)
    counts = Counter(seq)
    n = len(seq)
    out = {
        "id": record.id,
        "length": len(record.sequence),
        "mw": round(pa.molecular_weight(), 2),
        "pi": round(pa.isoelectric_point(), 3),
        "gravy": round(pa.gravy(), 4),
        "instability_index": round(pa.instability_index(), 3) if n > 1 else None,
        "aromaticity": round(pa.aromaticity(), 4),
        "charge_ph7": round(pa.charge_at_pH(7.0), 3),
        "composition": {g: round(sum(counts[c] for c in letters) / n, 4) for g, letters in GROUPS.items()},
        "most_common": [[aa, round(c / n, 4)] for aa, c in counts.most_common(3)],
        "ambiguous": len(record.ambiguous),
        "policy": record.policy,
    }
    if record.policy == "keep" and record.ambiguous:
        out["descriptors_on"] = f"sequence without its {len(record.ambiguous)} non-standard residues ({n} residues)"
    return out


@lru_cache(maxsize=1)
def _aligner():
    from Bio.Align import PairwiseAligner

    # Identity-oriented scoring: a match scores 1, a mismatch 0, gaps cost (open 1, extend 0.5),
    # so the aligner prefers a mismatch to opening a gap, and end gaps are charged like the rest.
    return PairwiseAligner(mode="global", match_score=1.0, mismatch_score=0.0,
                           open_gap_score=-1.0, extend_gap_score=-0.5)


def sequence_identity(a: str | ProteinRecord, b: str | ProteinRecord) -> float:
    """Global sequence identity in [0, 1]: identical positions / alignment columns (gaps included)
    of one optimal global alignment (Biopython ``PairwiseAligner``, scoring above). A fragment of a
    long protein therefore scores low: this is similarity of the whole sequences."""
    sa = a.sequence if isinstance(a, ProteinRecord) else parse_protein(a).sequence
    sb = b.sequence if isinstance(b, ProteinRecord) else parse_protein(b).sequence
    if sa == sb:
        return 1.0
    alignment = _aligner().align(sa, sb)[0]
    c = alignment.counts()
    columns = c.identities + c.mismatches + c.gaps
    return c.identities / columns if columns else 0.0


def inspect_proteins(items: Iterable[str], *, policy: Policy = "keep", min_length: int = 1, max_length: int = 5000,
                     max_items: int = 10000) -> list[ItemResult]:
    """Validate and describe each sequence (bare or one-record FASTA) on its own."""
    if policy not in POLICIES:  # a batch-level mistake, not an item's
        raise InvalidInputError(policy, "unknown ambiguity policy", hint=f"one of {', '.join(POLICIES)}")
    results = []
    for i, item in enumerate(check_batch(items, max_items, "protein sequences")):
        try:
            record = parse_protein(item, policy=policy, min_length=min_length, max_length=max_length)
            desc = describe_protein(record)
        except InvalidInputError as exc:
            results.append(error_result(i, item, exc))
            continue
        results.append(ItemResult(index=i, input=display(item), ok=True, warnings=record.warnings, descriptors=desc))
    return results
