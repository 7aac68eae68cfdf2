"""Molecules as SMILES (RDKit): parse with RDKit's own reason on failure, describe, fingerprint.

RDKit reports *why* a SMILES fails only through its C++ error log (``MolFromSmiles`` just returns
``None``). We capture that log per call with ``rdBase.CaptureErrorLog`` so the reason lands in the
error message and nothing is written to stdout (an MCP stdio server would be corrupted by it).
"""
from __future__ import annotations

import logging
import re
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem import Crippen, FilterCatalog, QED, rdFingerprintGenerator, rdinchi
from rdkit.Chem import rdMolDescriptors as rdmd

from es_merging.errors import InvalidInputError
from es_merging.modalities.base import ItemResult, check_batch, display, error_result

__all__ = [
    "parse_molecule", "describe_molecule", "qed", "morgan_fingerprint", "morgan_fingerprints",
    "tanimoto", "tanimoto_matrix", "inspect_molecules",
]

_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s?")


class _PythonLogCapture:
    """Fallback for RDKit without ``rdBase.CaptureErrorLog`` (older than 2025): route RDKit's logs
    through Python logging (a global switch, once) and collect the records while active."""

    _routed = False

    def __enter__(self):
        if not _PythonLogCapture._routed:
            rdBase.LogToPythonLogger()
            _PythonLogCapture._routed = True
        self._records: list[str] = []
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self._records.append(record.getMessage())
        self._logger = logging.getLogger("rdkit")
        self._logger.addHandler(self._handler)
        self._propagate, self._logger.propagate = self._logger.propagate, False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate
        return False

    @property
    def messages(self) -> str:
        return "\n".join(self._records)


# Captures are process-global in RDKit: concurrent parses in threads may see each other's reasons.
_capture_errors = getattr(rdBase, "CaptureErrorLog", _PythonLogCapture)


def _rdkit_reason(log: str, smiles: str) -> str:
    """Condense RDKit's multi-line log into one line: drop timestamps, the echoed input, the caret
    line and the redundant 'Failed parsing SMILES' summary."""
    parts: list[str] = []
    for line in log.splitlines():
        line = " ".join(_TIMESTAMP.sub("", line).split())
        if not line or line == smiles or set(line) <= {"~", "^", " "}:
            continue
        line = line.removeprefix("SMILES Parse Error:").strip().rstrip(":")
        if line.startswith("Failed parsing SMILES") or line in parts:
            continue
        parts.append(line)
    return "; ".join(parts) or "RDKit could not parse it"


def parse_molecule(smiles: str, *, max_length: int = 2000) -> Chem.Mol:
    """Parse and sanitise one SMILES. Raises :class:`InvalidInputError` quoting the item and RDKit's reason.

    Surrounding whitespace is stripped; whitespace *inside* is an error because RDKit would silently
    read ``"CC O"`` as ``CC`` (the rest becomes the molecule's name).
    """
    if not isinstance(smiles, str):
        raise InvalidInputError(smiles, f"expected a SMILES string, got {type(smiles).__name__}")
    text = smiles.strip()
    if not text:
        raise InvalidInputError(smiles, "empty SMILES", hint="give a SMILES string such as 'CCO'")
    if len(text) > max_length:
        raise InvalidInputError(smiles, f"SMILES too long: {len(text)} characters > max_length={max_length}",
                                hint="raise max_length if this is intended")
    ws = re.search(r"\s", text)
    if ws:
        raise InvalidInputError(smiles, f"whitespace inside the SMILES at position {ws.start() + 1}",
                                hint="one SMILES per item; use '.' to join fragments")
    with _capture_errors() as capture:
        mol = Chem.MolFromSmiles(text)
    if mol is None:
        raise InvalidInputError(smiles, f"invalid SMILES (RDKit: {_rdkit_reason(capture.messages, text)})")
    if mol.GetNumAtoms() == 0:
        raise InvalidInputError(smiles, "the SMILES contains no atoms")
    return mol


# ---------------------------------------------------------------------------------------------
# QED, exactly RDKit's values but cheaper: ``QED.properties`` always copies the molecule through
# ``RemoveHs`` (~90 us for a drug) and so loses RDKit's cached Crippen LogP / TPSA on the original,
# and it recomputes the rotatable bonds we already have. We skip the copy when there is no explicit
# hydrogen atom and reuse what describe_molecule computed; the 116 structural alerts, QED's largest
# cost, are matched in one C++ FilterCatalog call instead of 116 Python calls (~20% faster).
# Tests compare with ``QED.qed``.
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _alert_catalog() -> FilterCatalog.FilterCatalog:
    catalog = FilterCatalog.FilterCatalog()
    for i, alert in enumerate(QED.StructuralAlerts):
        catalog.AddEntry(FilterCatalog.FilterCatalogEntry(f"qed_alert_{i}", FilterCatalog.SmartsMatcher(alert)))
    return catalog


def _qed_properties(mol: Chem.Mol, rotb: int | None = None) -> QED.QEDproperties:
    if mol.GetNumAtoms() != mol.GetNumHeavyAtoms():
        with rdBase.BlockLogs():  # "not removing hydrogen atom without neighbors" is no news to the user
            mol = Chem.RemoveHs(mol)
        rotb = None
    arom = 0
    if mol.GetRingInfo().NumRings():  # deleting atoms cannot create rings: no ring, nothing to count
        arom = len(Chem.GetSSSR(Chem.DeleteSubstructs(Chem.Mol(mol), QED.AliphaticRings)))
    return QED.QEDproperties(
        MW=rdmd._CalcMolWt(mol),
        ALOGP=Crippen.MolLogP(mol),
        HBA=sum(len(mol.GetSubstructMatches(p)) for p in QED.Acceptors if mol.HasSubstructMatch(p)),
        HBD=rdmd.CalcNumHBD(mol),
        PSA=rdmd.CalcTPSA(mol),
        ROTB=rotb if rotb is not None else rdmd.CalcNumRotatableBonds(mol, rdmd.NumRotatableBondsOptions.Strict),
        AROM=arom,
        ALERTS=len(_alert_catalog().GetMatches(mol)),  # one entry per matching alert
    )


def qed(mol: Chem.Mol) -> float:
    """Quantitative estimate of drug-likeness (Bickerton 2012, RDKit's mean weights)."""
    return QED.qed(mol, qedProperties=_qed_properties(mol))


def _inchikey(mol: Chem.Mol) -> tuple[str | None, str | None]:
    """(InChIKey, warning). rdinchi returns InChI's message instead of logging it."""
    inchi, retcode, message, _log, _aux = rdinchi.MolToInchi(mol)
    if not inchi:
        return None, f"no InChIKey: {message or 'InChI generation failed'}"
    return rdinchi.InchiToInchiKey(inchi), (f"InChI: {message}" if retcode and message else None)


def describe_molecule(mol: Chem.Mol, warnings: list[str] | None = None) -> dict:
    """RDKit descriptors of one parsed molecule.

    HBD/HBA are RDKit's pharmacophore counts (``CalcNumHBD``/``CalcNumHBA``), also used for the
    Lipinski rule of five: MW <= 500, LogP <= 5, HBD <= 5, HBA <= 10; ``lipinski_pass`` allows at
    most one violation (Lipinski 1997). InChI messages (e.g. undefined stereo) go to ``warnings``.
    """
    mw = rdmd._CalcMolWt(mol)
    logp = Crippen.MolLogP(mol)
    hbd = rdmd.CalcNumHBD(mol)
    hba = rdmd.CalcNumHBA(mol)
    rotb = rdmd.CalcNumRotatableBonds(mol, rdmd.NumRotatableBondsOptions.Strict)
    inchikey, warning = _inchikey(mol)
    if warning and warnings is not None:
        warnings.append(warning)
    violations = int(mw > 500) + int(logp > 5) + int(hbd > 5) + int(hba > 10)
    return {
        "canonical_smiles": Chem.MolToSmiles(mol),
        "inchikey": inchikey,
        "formula": rdmd.CalcMolFormula(mol),
        "mw": round(mw, 4),
        "logp": round(logp, 4),
        "tpsa": round(rdmd.CalcTPSA(mol), 4),
        "hbd": hbd,
        "hba": hba,
        "rotatable_bonds": rotb,
        "aromatic_rings": rdmd.CalcNumAromaticRings(mol),
        "heavy_atoms": mol.GetNumHeavyAtoms(),
        "fragments": len(Chem.GetMolFrags(mol)),
        "qed": round(QED.qed(mol, qedProperties=_qed_properties(mol, rotb)), 4),
        "lipinski_violations": violations,
        "lipinski_pass": violations <= 1,
    }


# ---------------------------------------------------------------------------------------------
# Fingerprints and similarity (used by probe diversity sampling and k-shot retrieval)
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _morgan_generator(radius: int, n_bits: int):
    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)


def _as_mol(item: str | Chem.Mol, index: int | None = None) -> Chem.Mol:
    if isinstance(item, Chem.Mol):
        return item
    try:
        return parse_molecule(item)
    except InvalidInputError as exc:
        raise InvalidInputError(item, exc.reason, exc.hint, index) from None


def morgan_fingerprint(smiles_or_mol: str | Chem.Mol, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """Morgan (ECFP-like) bit vector as ``uint8`` 0/1, shape ``[n_bits]``."""
    return _morgan_generator(radius, n_bits).GetFingerprintAsNumPy(_as_mol(smiles_or_mol)).astype(np.uint8, copy=False)


def morgan_fingerprints(items: Sequence[str | Chem.Mol], radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """``uint8[N, n_bits]``. An invalid item raises, naming its index (callers inspect first)."""
    gen = _morgan_generator(radius, n_bits)
    out = np.zeros((len(items), n_bits), dtype=np.uint8)
    for i, item in enumerate(items):
        out[i] = gen.GetFingerprintAsNumPy(_as_mol(item, i))
    return out


def _fp_array(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return morgan_fingerprint(x)


def tanimoto(a, b) -> float:
    """Tanimoto similarity of two fingerprints (arrays, SMILES or Mols). Two empty fingerprints
    share nothing: 0.0."""
    fa, fb = _fp_array(a).astype(bool), _fp_array(b).astype(bool)
    union = int(np.count_nonzero(fa | fb))
    return float(np.count_nonzero(fa & fb)) / union if union else 0.0


def tanimoto_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """``float32[N, M]`` pairwise Tanimoto between fingerprint rows of ``a`` and ``b`` (default ``a``).
    Counts are exact in float32 up to 2^24 bits, far above any fingerprint size."""
    fa = np.asarray(a, dtype=np.float32)
    fb = fa if b is None else np.asarray(b, dtype=np.float32)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        sim = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return sim.astype(np.float32)


@lru_cache(maxsize=8192)
def _describe_text(text: str) -> tuple[dict, tuple[str, ...]]:
    """Descriptors of one stripped SMILES, cached: screens and probes repeat the same few hundred
    drugs across thousands of rows (8192 entries, ~2 kB each). Invalid SMILES raise, uncached."""
    mol = parse_molecule(text, max_length=len(text))
    warnings: list[str] = []
    desc = describe_molecule(mol, warnings)
    if desc["fragments"] > 1:
        warnings.append(f"{desc['fragments']} disconnected fragments (salt or mixture?): "
                        "descriptors describe the whole input")
    return desc, tuple(warnings)


def inspect_molecules(smiles_list: Iterable[str], *, max_length: int = 2000, max_items: int = 10000) -> list[ItemResult]:
    """Validate and describe each SMILES on its own; one :class:`ItemResult` per item, in order."""
    items = check_batch(smiles_list, max_items, "SMILES strings")
    results = []
    for i, smiles in enumerate(items):
        try:
            if not isinstance(smiles, str) or len(smiles.strip()) > max_length:
                parse_molecule(smiles, max_length=max_length)  # raises; keeps huge keys out of the cache
            desc, warnings = _describe_text(smiles.strip())
        except InvalidInputError as exc:
            results.append(error_result(i, smiles, exc))
            continue
        results.append(ItemResult(index=i, input=display(smiles), ok=True, warnings=list(warnings),
                                  descriptors=dict(desc)))
    return results
