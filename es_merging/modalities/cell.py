"""Single-cell expression profiles (AnnData): h5ad rows, gene->value mappings or ranked gene lists,
reduced to a ranking of genes whose top-k becomes the text span ("G1, G2, ...", Cell-o1 style).

Value kinds
  ``counts``      non-negative integers (raw UMI/read counts); library size = row sum. Integer
                  values with a negative among them are reported as negative counts (an error)
  ``normalized``  anything else (log1p, CPM, scaled z-scores with negatives); library size from an
                  obs column (``n_counts``/``total_counts``/``nCount_RNA``) when the file has one
  ``ranked``      a ranked gene list without values
Genes are ranked by value, descending, ties broken by gene name so the order is reproducible.
When the values have no negatives, only genes with a positive value are kept (a zero is "not
expressed"); scaled data with negatives keeps every gene, since there 0 is just the mean.

h5ad files are read with h5py and anndata's element readers rather than
``anndata.read_h5ad(backed="r")``: backed mode still loads ``layers``, ``obsm``, ``obsp`` and ``uns``
into memory, which defeats "any size". Here only obs names, the gene symbols and the selected rows
(in chunks of ``_CHUNK``) are read.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence

import numpy as np

from es_merging.errors import InvalidInputError
from es_merging.modalities.base import ItemResult, check_batch, display, error_result

__all__ = [
    "CellProfile", "detect_value_kind", "cell_from_mapping", "cell_from_ranked", "cells_from_h5ad",
    "iter_h5ad", "top_genes", "cell_span_text", "gene_jaccard", "describe_cell", "inspect_cell_profiles",
]

ValueKind = Literal["counts", "normalized", "ranked"]
UnknownPolicy = Literal["warn", "error"]
_CHUNK = 64  # rows per read: bounded memory (64 x n_genes floats) with few HDF5 calls
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "gene_name", "gene_names", "feature_name", "symbol", "Symbol")
_LIBSIZE_COLUMNS = ("n_counts", "total_counts", "nCount_RNA")
_H5AD_KEYS = {"h5ad", "obs", "limit", "layer", "use_raw", "gene_symbols"}


@dataclass
class CellProfile:
    """One cell: genes ranked by value (descending) and, unless ``ranked``, their values."""

    id: str | None
    genes: list[str]
    values: list[float] | None
    value_kind: str
    library_size: float | None
    source: str
    warnings: list[str] = field(default_factory=list)


def _few(names: Sequence[str], n: int = 5) -> str:
    names = list(names)
    return ", ".join(map(str, names[:n])) + (f" ... ({len(names)} in total)" if len(names) > n else "")


def detect_value_kind(values: np.ndarray) -> str:
    """``counts`` if every value is a non-negative integer, else ``normalized``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and (v.min() < 0 or not np.array_equal(v, np.round(v))):
        return "normalized"
    return "counts"


def _check_known(genes: Sequence[str], known_genes: set[str] | None, unknown_genes: str, item: object) -> list[str]:
    if known_genes is None:
        return []
    if unknown_genes not in ("warn", "error"):
        raise InvalidInputError(unknown_genes, "unknown_genes must be 'warn' or 'error'")
    unknown = [g for g in genes if g not in known_genes]
    if not unknown:
        return []
    msg = f"{len(unknown)} unknown gene symbols: {_few(unknown)}"
    if unknown_genes == "error":
        raise InvalidInputError(item, msg, hint="gene symbols are case-sensitive (human: CD3E, mouse: Cd3e)")
    return [msg]


def _build(genes: np.ndarray, values: np.ndarray, *, id: str | None, source: str, value_kind: str,
           item: object, library_size: float | None = None, name_rank: np.ndarray | None = None,
           dedupe: bool = False) -> CellProfile:
    """Validate one row of values and rank its genes. ``name_rank`` (gene-name order) may be given
    precomputed for the many rows of one file; ``dedupe`` keeps the highest value of a repeated gene."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        kind = "NaN" if np.isnan(values[bad]).any() else "infinite"
        raise InvalidInputError(item, f"{kind} values for {int(bad.sum())} genes: {_few(genes[bad])}",
                                hint="impute or drop them before inspecting")
    negative = values < 0
    if value_kind == "auto":
        # Integers with a negative among them are not a plausible normalisation (log1p and scaling
        # give fractions): treat them as broken counts, reported below, rather than guess.
        integral = np.array_equal(values, np.round(values))
        value_kind = "counts" if integral else "normalized"
    elif value_kind not in ("counts", "normalized"):
        raise InvalidInputError(value_kind, "value_kind must be 'auto', 'counts' or 'normalized'")
    warnings: list[str] = []
    if value_kind == "counts":
        if negative.any():
            raise InvalidInputError(item, f"negative counts for {int(negative.sum())} genes: "
                                          f"{_few(f'{g}={v:g}' for g, v in zip(genes[negative], values[negative]))}",
                                    hint="counts cannot be negative; pass value_kind='normalized' for scaled data")
        if not np.array_equal(values, np.round(values)):
            warnings.append("declared counts are not all integers (ambient-corrected?)")
    positive = values > 0
    if not positive.any():
        raise InvalidInputError(item, f"empty profile: no gene has a positive value ({len(values)} genes)")
    keep = np.flatnonzero(positive) if not negative.any() else np.arange(len(values))
    if name_rank is None:
        name_rank = np.argsort(np.argsort(genes, kind="stable"), kind="stable")
    order = keep[np.lexsort((name_rank[keep], -values[keep]))]
    if dedupe:
        _, first = np.unique(genes[order], return_index=True)
        order = order[np.sort(first)]
    if value_kind == "counts":
        library_size = float(values.sum())
    return CellProfile(id, genes[order].tolist(), values[order].tolist(), value_kind, library_size, source, warnings)


def cell_from_mapping(mapping: Mapping[str, float], id: str | None = None, *, value_kind: str = "auto",
                      known_genes: set[str] | None = None, unknown_genes: UnknownPolicy = "warn",
                      source: str = "mapping") -> CellProfile:
    """A profile from ``{gene: value}``. Genes repeated up to case/whitespace are an error."""
    if not isinstance(mapping, Mapping) or not mapping:
        raise InvalidInputError(mapping, "expected a non-empty mapping gene -> value")
    names, vals, seen, dups = [], [], set(), []
    for k, v in mapping.items():
        if not isinstance(k, str) or not k.strip():
            raise InvalidInputError(display(mapping), f"gene names must be non-empty strings, got {k!r}")
        name = k.strip()
        if name.upper() in seen:
            dups.append(name)
        seen.add(name.upper())
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InvalidInputError(display(mapping), f"value of gene {name!r} is not a number: {v!r}")
        names.append(name)
        vals.append(float(v))
    if dups:
        raise InvalidInputError(display(mapping), f"duplicate genes: {_few(dups)}", hint="give each gene once")
    profile = _build(np.array(names, dtype=object), np.array(vals), id=id, source=source, value_kind=value_kind,
                     item=display(mapping))
    profile.warnings += _check_known(profile.genes, known_genes, unknown_genes, display(mapping))
    return profile


def cell_from_ranked(genes: Sequence[str] | str, id: str | None = None, *, known_genes: set[str] | None = None,
                     unknown_genes: UnknownPolicy = "warn", source: str = "ranked list") -> CellProfile:
    """A profile from genes already ranked (highest first): a list or a comma-separated string."""
    parts = genes.split(",") if isinstance(genes, str) else genes
    if isinstance(parts, (bytes, Mapping)) or not isinstance(parts, Sequence):
        raise InvalidInputError(genes, "expected a list of gene names or a comma-separated string")
    names = []
    for i, g in enumerate(parts, 1):
        if not isinstance(g, str):
            raise InvalidInputError(display(genes), f"gene {i} is not a string: {g!r}")
        names.append(g.strip())
    while names and not names[-1]:  # a trailing comma is harmless
        names.pop()
    if not names:
        raise InvalidInputError(display(genes), "empty gene list")
    for i, name in enumerate(names, 1):
        if not name:
            raise InvalidInputError(display(genes), f"empty gene name at position {i}")
        if re.search(r"\s", name):
            raise InvalidInputError(display(genes), f"gene name with whitespace at position {i}: {name!r}",
                                    hint="separate genes with commas")
    upper = [n.upper() for n in names]
    dups = sorted({n for n, u in zip(names, upper) if upper.count(u) > 1}) if len(set(upper)) < len(upper) else []
    if dups:
        raise InvalidInputError(display(genes), f"duplicate genes: {_few(dups)}", hint="give each gene once")
    warnings = _check_known(names, known_genes, unknown_genes, display(genes))
    return CellProfile(id, names, None, "ranked", None, source, warnings)


# ---------------------------------------------------------------------------------------------
# h5ad
# ---------------------------------------------------------------------------------------------
class _H5ad:
    """An open .h5ad: obs names, gene symbols and row access to X / a layer / raw.X."""

    def __init__(self, path: str | os.PathLike, *, layer: str | None, use_raw: bool, gene_symbols: str | None):
        import h5py
        from anndata.io import read_elem, sparse_dataset

        self.path = str(path)
        self.warnings: list[str] = []
        if not os.path.exists(self.path):
            raise InvalidInputError(self.path, "file not found", hint=f"check the path; the working directory is {os.getcwd()}")
        if os.path.isdir(self.path):
            raise InvalidInputError(self.path, "is a directory, not an .h5ad file",
                                    hint="zarr stores are not supported: anndata.read_zarr(p).write_h5ad('x.h5ad')")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as exc:
            raise InvalidInputError(self.path, f"not a readable HDF5/.h5ad file (h5py: {str(exc).split('(')[-1].rstrip(')')})",
                                    hint="give an AnnData .h5ad written by anndata/scanpy write_h5ad; "
                                         "the file may be truncated or corrupt") from None
        try:
            f = self.file
            for key in ("X", "obs", "var"):
                if key not in f:
                    raise InvalidInputError(self.path, f"an HDF5 file but not AnnData: no {key!r} element",
                                            hint="write it with anndata (adata.write_h5ad)")
            if use_raw and layer:
                raise InvalidInputError(self.path, "choose either layer or use_raw, not both")
            if use_raw:
                if "raw" not in f:
                    raise InvalidInputError(self.path, "use_raw asked but the file has no .raw", hint="drop use_raw")
                matrix, var = f["raw/X"], f["raw/var"]
            elif layer:
                layers = list(f["layers"].keys()) if "layers" in f else []
                if layer not in layers:
                    raise InvalidInputError(self.path, f"no layer {layer!r}", hint=f"layers: {layers or 'none'}")
                matrix, var = f["layers"][layer], f["var"]
            else:
                matrix, var = f["X"], f["var"]
            self.obs_names = np.asarray(read_elem(f["obs"][f["obs"].attrs["_index"]]), dtype=object)
            self.symbols = self._symbols(var, read_elem, gene_symbols)
            self.libsize = self._libsize(f["obs"], read_elem)
            self.matrix = sparse_dataset(matrix) if isinstance(matrix, h5py.Group) else matrix
        except InvalidInputError:
            self.file.close()
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            self.file.close()
            raise InvalidInputError(self.path, f"cannot read the AnnData structure ({type(exc).__name__}: {exc})",
                                    hint="re-save it with a recent anndata (adata.write_h5ad)") from None
        shape = tuple(self.matrix.shape)
        if shape != (len(self.obs_names), len(self.symbols)):
            self.file.close()
            raise InvalidInputError(self.path, f"matrix shape {shape} does not match obs x var "
                                               f"({len(self.obs_names)} x {len(self.symbols)})")
        self.name_rank = np.argsort(np.argsort(self.symbols, kind="stable"), kind="stable")
        self.has_duplicates = len(np.unique(self.symbols)) < len(self.symbols)
        if self.has_duplicates:
            self.warnings.append("repeated gene symbols in var: each keeps its highest value")

    @staticmethod
    def _libsize(obs, read_elem) -> np.ndarray | None:
        """Per-cell library size from a conventional obs column, if one is numeric."""
        for column in _LIBSIZE_COLUMNS:
            if column in obs:
                try:
                    return np.asarray(read_elem(obs[column]), dtype=np.float64)
                except (TypeError, ValueError):
                    continue
        return None

    def _symbols(self, var, read_elem, column: str | None) -> np.ndarray:
        names = np.asarray(read_elem(var[var.attrs["_index"]]), dtype=object).astype(str).astype(object)
        if column is None:
            if names.size and np.mean([bool(_ENSEMBL.match(n)) for n in names[:1000]]) > 0.5:
                column = next((c for c in _SYMBOL_COLUMNS if c in var), None)
                if column is None:
                    self.warnings.append("var_names are Ensembl IDs and no gene-symbol column was found: ranking IDs")
                    return names
            else:
                return names
        if column not in var:
            raise InvalidInputError(self.path, f"no var column {column!r}", hint=f"var columns: {list(var.keys())}")
        symbols = np.asarray(read_elem(var[column]), dtype=object)
        missing = np.array([not isinstance(s, str) or not s for s in symbols])
        symbols[missing] = names[missing]  # no symbol: keep the ID rather than an empty name
        return symbols

    def resolve(self, obs: Sequence[str | int] | None, limit: int | None) -> list[tuple[str, int | InvalidInputError]]:
        n = len(self.obs_names)
        if obs is None:
            rows = range(n if limit is None else min(limit, n))
            return [(f"{self.path}[{self.obs_names[i]}]", i) for i in rows]
        lookup: dict[str, int] | None = None
        out: list[tuple[str, int | InvalidInputError]] = []
        for sel in obs:
            label = f"{self.path}[{sel}]"
            if isinstance(sel, (int, np.integer)) and not isinstance(sel, bool):
                ok = -n <= sel < n
                out.append((label, int(sel) % n if ok else InvalidInputError(
                    label, f"obs index {sel} out of range ({n} cells)")))
                continue
            if lookup is None:
                lookup = {}
                for i, name in enumerate(self.obs_names):
                    lookup.setdefault(name, i)
            i = lookup.get(str(sel))
            out.append((label, i if i is not None else InvalidInputError(
                label, f"obs name {sel!r} not found ({n} cells)", hint=f"e.g. {self.obs_names[0]!r}; or give an int index")))
        return out

    def read(self, rows: list[int]) -> dict[int, np.ndarray]:
        """Dense float64 rows for the given indices (one HDF5 read, sorted, as h5py requires)."""
        uniq = np.unique(rows)
        block = self.matrix[uniq]
        block = block.toarray() if hasattr(block, "toarray") else np.asarray(block)
        return {int(i): block[j].astype(np.float64) for j, i in enumerate(uniq)}

    def close(self) -> None:
        self.file.close()


def iter_h5ad(path: str | os.PathLike, *, obs: Sequence[str | int] | None = None, limit: int | None = 100,
              layer: str | None = None, use_raw: bool = False, value_kind: str = "auto",
              gene_symbols: str | None = None, known_genes: set[str] | None = None,
              unknown_genes: UnknownPolicy = "warn") -> Iterator[tuple[str, CellProfile | InvalidInputError]]:
    """Yield ``(label, profile or error)`` per selected cell; a file-level problem raises at once.
    ``obs``: obs names and/or int positions, all taken; None takes the first ``limit`` cells."""
    if limit is not None and limit < 1:
        raise InvalidInputError(limit, "limit must be >= 1")
    h5 = _H5ad(path, layer=layer, use_raw=use_raw, gene_symbols=gene_symbols)
    source = f"h5ad:{h5.path}" + (f":layer={layer}" if layer else ":raw" if use_raw else "")
    try:
        selection = h5.resolve(obs, limit)
        for start in range(0, len(selection), _CHUNK):
            window = selection[start:start + _CHUNK]
            wanted = [i for _, i in window if isinstance(i, int)]
            try:
                rows = h5.read(wanted) if wanted else {}
            except (OSError, ValueError, KeyError) as exc:  # a truncated/corrupt dataset
                err = f"cannot read rows from the file ({type(exc).__name__}: {exc})"
                rows, window = {}, [(label, i if not isinstance(i, int) else InvalidInputError(label, err))
                                    for label, i in window]
            for label, i in window:
                if not isinstance(i, int):
                    yield label, i
                    continue
                try:
                    libsize = None if h5.libsize is None else float(h5.libsize[i])
                    profile = _build(h5.symbols, rows[i], id=str(h5.obs_names[i]), source=source,
                                     value_kind=value_kind, item=label, library_size=libsize,
                                     name_rank=h5.name_rank, dedupe=h5.has_duplicates)
                    profile.warnings = h5.warnings + profile.warnings
                    profile.warnings += _check_known(profile.genes, known_genes, unknown_genes, label)
                    yield label, profile
                except InvalidInputError as exc:
                    yield label, exc
    finally:
        h5.close()


def cells_from_h5ad(path: str | os.PathLike, *, obs: Sequence[str | int] | None = None, limit: int | None = 100,
                    layer: str | None = None, use_raw: bool = False, value_kind: str = "auto",
                    gene_symbols: str | None = None) -> list[CellProfile]:
    """Profiles of the selected cells (``obs``, else the first ``limit``). The first invalid cell raises;
    :func:`inspect_cell_profiles` reports each cell on its own instead."""
    out = []
    for _label, result in iter_h5ad(path, obs=obs, limit=limit, layer=layer, use_raw=use_raw,
                                    value_kind=value_kind, gene_symbols=gene_symbols):
        if isinstance(result, InvalidInputError):
            raise result
        out.append(result)
    return out


# ---------------------------------------------------------------------------------------------
# Spans, similarity, description
# ---------------------------------------------------------------------------------------------
def top_genes(profile: CellProfile, k: int = 50) -> list[str]:
    if k < 1:
        raise InvalidInputError(k, "k must be >= 1")
    return profile.genes[:k]


def cell_span_text(profile: CellProfile, k: int = 50) -> str:
    """The cell as text for a prompt: its top-k genes, comma-separated (Cell-o1 style)."""
    return ", ".join(top_genes(profile, k))


def gene_jaccard(a: CellProfile | Sequence[str], b: CellProfile | Sequence[str], k: int = 50) -> float:
    """Jaccard index of the top-k gene sets (0.0 when both are empty)."""
    sa = set(a.genes[:k] if isinstance(a, CellProfile) else list(a)[:k])
    sb = set(b.genes[:k] if isinstance(b, CellProfile) else list(b)[:k])
    union = sa | sb
    return len(sa & sb) / len(union) if union else 0.0


def describe_cell(profile: CellProfile, k: int = 50) -> dict:
    n_expr = len(profile.genes) if profile.values is None else int(sum(v > 0 for v in profile.values))
    return {
        "id": profile.id,
        "source": profile.source,
        "value_kind": profile.value_kind,
        "n_genes": len(profile.genes),
        "n_expressed": n_expr,
        "library_size": profile.library_size,
        "top_genes": top_genes(profile, k),
    }


class _TooMany(InvalidInputError):
    """The batch outgrew max_items: a batch-level error, never reported as one item's."""


def _h5ad_request(item: object) -> dict | None:
    """An item naming an h5ad selection: ``{"h5ad": path, ...}`` or a bare ``*.h5ad`` path string."""
    if isinstance(item, Mapping) and "h5ad" in item:
        extra = set(item) - _H5AD_KEYS
        if extra:
            raise InvalidInputError(display(item), f"unknown keys {sorted(extra)}", hint=f"allowed: {sorted(_H5AD_KEYS)}")
        return dict(item)
    if isinstance(item, (str, os.PathLike)) and "," not in str(item) and str(item).strip().lower().endswith(".h5ad"):
        return {"h5ad": str(item).strip()}
    return None


def inspect_cell_profiles(items: Iterable[Any], *, top_k: int = 50, known_genes: set[str] | None = None,
                          unknown_genes: UnknownPolicy = "warn", value_kind: str = "auto", limit: int | None = 100,
                          max_items: int = 10000) -> list[ItemResult]:
    """Validate and describe each cell. Items: a CellProfile, a gene->value mapping, a ranked gene list
    or comma-separated string, or an h5ad selection (``{"h5ad": path, "obs": [...], "limit": n,
    "layer": ..., "use_raw": ...}`` or a bare ``*.h5ad`` path), which expands to one result per cell.
    ``index`` is the position in the returned list; ``input`` names the item (``path[obs]`` for h5ad)."""
    if top_k < 1:
        raise InvalidInputError(top_k, "top_k must be >= 1")
    results: list[ItemResult] = []

    def add(label: object, outcome: CellProfile | InvalidInputError) -> None:
        if len(results) >= max_items:
            raise _TooMany(f"<{len(results)}+ cells>", f"more than max_items={max_items} cells",
                                    hint="select fewer cells (obs/limit) or raise max_items")
        if isinstance(outcome, InvalidInputError):
            results.append(error_result(len(results), label, outcome))
        else:
            results.append(ItemResult(index=len(results), input=display(label), ok=True,
                                      warnings=outcome.warnings, descriptors=describe_cell(outcome, top_k)))

    for item in check_batch(items, max_items, "cell profiles"):
        try:
            request = _h5ad_request(item)
            if request is not None:
                path = request.pop("h5ad")
                request.setdefault("limit", limit)
                try:
                    for label, outcome in iter_h5ad(path, value_kind=value_kind, known_genes=known_genes,
                                                    unknown_genes=unknown_genes, **request):
                        add(label, outcome)
                except _TooMany:
                    raise
                except InvalidInputError as exc:  # the file as a whole
                    add(path, exc)
                continue
            if isinstance(item, CellProfile):
                item.warnings = item.warnings + _check_known(item.genes, known_genes, unknown_genes, item.id)
                add(item.id or "<profile>", item)
            elif isinstance(item, Mapping):
                add(item, cell_from_mapping(item, value_kind=value_kind, known_genes=known_genes,
                                            unknown_genes=unknown_genes))
            else:
                add(item, cell_from_ranked(item, known_genes=known_genes, unknown_genes=unknown_genes))
        except _TooMany:
            raise
        except InvalidInputError as exc:
            add(item, exc)
    return results
