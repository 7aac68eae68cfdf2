"""Screening: every combination of drugs x proteins x cells (or explicit triples) scored with one
task and ranked by the probability of a chosen option.

- Each distinct input is validated once; an invalid drug/protein/cell is reported and left out of
  the product (it never sinks the screen).
- The product is refused up front when it has more rows than ``limit`` (a clear error naming the
  list sizes), before any model call.
- Rows are scored in chunks through :func:`es_merging.predict.predict` (the same code path as every
  other prediction) and streamed to a spool file on disk as they come; only (probability, row
  number, file offset) is kept per row, in a bounded heap when ``top_n`` is given. At the end the
  ranked CSV is written to a temporary file beside ``out`` and renamed over it, so a reader never
  sees a half-written file and an interrupted screen leaves nothing behind.
"""
from __future__ import annotations

import csv
import heapq
import io
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict, Field

from es_merging.errors import EsMergingError, InvalidInputError
from es_merging.predict import DEFAULT_BATCH_SIZE, SupportSet, Task, _Validator, get_task, predict
from es_merging.probe import MODALITY_ORDER, ProbeSample

Progress = Callable[[str, int, int], None]
DEFAULT_LIMIT = 100_000
HARD_LIMIT = 10_000_000
CHUNK = 256
_KEY = {"molecule": "drug", "protein": "protein", "cell": "cell"}
_FIELD = {"molecule": "smiles", "protein": "protein", "cell": "cell"}


class Entity(BaseModel):
    """One screened input with a display name (the input itself when not given)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    value: str | list[str]


class ScreenResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: str
    task: str
    option: str
    rows: int = Field(description="rows scored and written")
    product: int = Field(description="rows in the requested product, before invalid inputs were left out")
    written: int = Field(description="rows in the ranked CSV (top_n or all)")
    invalid: list[dict[str, Any]] = Field(default_factory=list, description="inputs left out, with the reason")
    failed: int = 0
    top: list[dict[str, Any]] = Field(default_factory=list, description="the first ranked rows")
    seconds: float = 0.0
    predictions_per_second: float = 0.0


def _entities(values: Sequence[Any] | None, modality: str) -> list[Entity]:
    """Items: an :class:`Entity`, a ``(name, value)`` tuple, or the bare value (a cell: a list of
    ranked genes or a comma-separated string)."""
    out = []
    for i, v in enumerate(values or []):
        if isinstance(v, Entity):
            out.append(v)
        elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
            out.append(Entity(name=v[0], value=_cell(v[1]) if modality == "cell" else v[1]))
        elif modality == "cell":
            genes = _cell(v)
            out.append(Entity(name=",".join(genes[:3]) + ("..." if len(genes) > 3 else ""), value=genes))
        elif isinstance(v, str):
            out.append(Entity(name=v if len(v) <= 40 else f"{_KEY[modality]}{i}", value=v))
        else:
            raise InvalidInputError(v, f"expected a {modality} string or a (name, value) pair", index=i)
    return out


def _cell(value: Any) -> list[str]:
    if isinstance(value, str):
        return [g.strip() for g in value.split(",") if g.strip()]
    return [str(g) for g in value]


def screen(
    model,
    task: str | Task,
    *,
    out: str | Path,
    smiles: Sequence[Any] | None = None,
    proteins: Sequence[Any] | None = None,
    cells: Sequence[Any] | None = None,
    triples: Sequence[ProbeSample | dict[str, Any]] | None = None,
    option: str | None = None,
    limit: int = DEFAULT_LIMIT,
    top_n: int | None = None,
    support: SupportSet | Sequence[ProbeSample | dict[str, Any]] | None = None,
    k: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    overwrite: bool = True,
    show: int = 10,
) -> ScreenResult:
    """Score the product ``smiles x proteins x cells`` (the lists the task uses), or ``triples``,
    and write the rows ranked by P(``option``) (default: the task's positive option) to ``out``."""
    t0 = time.time()
    task = get_task(task)
    option = option or task.positive_option
    if option not in task.options:
        raise EsMergingError(f"option {option!r} is not an answer of task {task.name!r}: {list(task.options)}")
    if not 1 <= limit <= HARD_LIMIT:
        raise EsMergingError(f"limit={limit} must be between 1 and {HARD_LIMIT}")
    if top_n is not None and top_n < 1:
        raise EsMergingError("top_n must be >= 1")
    out = Path(out)
    if out.exists() and (out.is_dir() or not overwrite):
        raise EsMergingError(f"{out} already exists; choose another --out")
    if not out.parent.is_dir():
        raise EsMergingError(f"the directory of {out} does not exist")
    if k and support is not None and not isinstance(support, SupportSet):
        support = SupportSet(support)

    lists = {"molecule": smiles, "protein": proteins, "cell": cells}
    used = [m for m in MODALITY_ORDER if m in task.modalities or (m in task.optional_modalities and lists[m])]
    invalid: list[dict[str, Any]] = []
    validator = _Validator(model)
    if triples is not None:
        if any(lists.values()):
            raise EsMergingError("give either lists (smiles/proteins/cells) or explicit triples, not both")
        product = len(triples)
        _check_limit(product, limit, f"{product} explicit triples")
        rows_iter: Iterator[tuple[dict[str, str], ProbeSample]] = _triple_rows(triples, used)
    else:
        for m in MODALITY_ORDER:
            if lists[m] and m not in used:
                raise EsMergingError(f"task {task.name!r} does not use {_KEY[m]}s; "
                                     f"it takes {', '.join(_KEY[x] + 's' for x in (*task.modalities, *task.optional_modalities))}")
        missing = [m for m in task.modalities if not lists[m]]
        if missing:
            raise EsMergingError(f"task {task.name!r} needs at least one {', '.join(_KEY[m] for m in missing)}")
        ents = {m: _entities(lists[m], m) for m in used}
        product = 1
        for m in used:
            product *= len(ents[m])
        _check_limit(product, limit, " x ".join(f"{len(ents[m])} {_KEY[m]}s" for m in used))
        total_inputs = sum(len(v) for v in ents.values())
        checked = 0
        for m in used:
            kept = []
            for i, e in enumerate(ents[m]):
                try:
                    fn = {"molecule": validator.molecule, "protein": validator.protein, "cell": validator.cell}[m]
                    kept.append(Entity(name=e.name, value=fn(e.value)))
                except InvalidInputError as exc:
                    invalid.append({"kind": _KEY[m], "index": i, "name": e.name, "error": exc.reason})
                checked += 1
                if progress and (checked % 100 == 0 or checked == total_inputs):
                    progress("validate", checked, total_inputs)
            ents[m] = kept
        rows_iter = _product_rows(ents, used)

    total = product if triples is not None else _count(ents, used)
    spool_fd, spool_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".spool")
    tmp_fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(tmp_fd)
    heap: list[tuple[float, int, int, int]] = []  # (p, -row, offset, length): min-heap of the best
    scored = failed = 0
    header = [_KEY[m] for m in used] + [f"p_{o}" for o in task.options] + ["choice"]
    try:
        with os.fdopen(spool_fd, "w+b") as spool:
            offset = 0
            done = 0
            while True:
                chunk = list(itertools.islice(rows_iter, CHUNK))
                if not chunk:
                    break
                preds = predict(model, [s for _, s in chunk], task, support=support, k=k, batch_size=batch_size)
                for (names, _s), pred in zip(chunk, preds):
                    if not pred.ok:
                        failed += 1
                        if len(invalid) < 1000:
                            invalid.append({"kind": "row", "name": "/".join(names.values()), "error": pred.error})
                        continue
                    line = _csv_line([names[_KEY[m]] for m in used]
                                     + [f"{pred.probabilities[o]:.6g}" for o in task.options] + [pred.choice])
                    data = line.encode()
                    spool.write(data)
                    entry = (pred.probabilities[option], -scored, offset, len(data))
                    offset += len(data)
                    if top_n is None or len(heap) < top_n:
                        heapq.heappush(heap, entry)
                    elif entry > heap[0]:
                        heapq.heapreplace(heap, entry)
                    scored += 1
                done += len(chunk)
                if progress:
                    progress("screen", done, total)
            ranked = sorted(heap, reverse=True)
            spool.flush()
            top: list[dict[str, Any]] = []
            with open(tmp_name, "w", newline="") as fh:
                fh.write(_csv_line(["rank", *header]))
                for rank, (_p, _row, off, length) in enumerate(ranked, 1):
                    spool.seek(off)
                    line = spool.read(length).decode()
                    fh.write(f"{rank},{line}")
                    if rank <= show:
                        values = next(csv.reader([line]))
                        row = dict(zip(header, values))
                        top.append({"rank": rank, **{k: float(v) if k.startswith("p_") else v for k, v in row.items()}})
            os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    finally:
        Path(spool_name).unlink(missing_ok=True)
    seconds = time.time() - t0
    return ScreenResult(out=str(out), task=task.name, option=option, rows=scored, product=product,
                        written=len(ranked), invalid=invalid, failed=failed, top=top, seconds=round(seconds, 3),
                        predictions_per_second=round(scored / seconds, 2) if seconds > 0 else 0.0)


def _check_limit(n: int, limit: int, what: str) -> None:
    if n > limit:
        raise EsMergingError(f"the screen has {n:,} rows ({what}), above the row limit of {limit:,}; "
                             "shorten the lists or raise --limit")
    if n == 0:
        raise EsMergingError("nothing to screen: a list is empty")


def _count(ents: dict[str, list[Entity]], used: list[str]) -> int:
    n = 1
    for m in used:
        n *= len(ents[m])
    return n


def _product_rows(ents: dict[str, list[Entity]], used: list[str]) -> Iterator[tuple[dict[str, str], ProbeSample]]:
    for combo in itertools.product(*(ents[m] for m in used)):
        names = {_KEY[m]: e.name for m, e in zip(used, combo)}
        sample = ProbeSample(**{_FIELD[m]: e.value for m, e in zip(used, combo)})
        yield names, sample


def _triple_rows(triples: Sequence[ProbeSample | dict[str, Any]], used: list[str]):
    for i, t in enumerate(triples):
        if isinstance(t, ProbeSample):
            sample = t
        else:
            data = {k: v for k, v in t.items() if k in ("id", "smiles", "protein", "cell")}
            if isinstance(data.get("cell"), str):
                data["cell"] = _cell(data["cell"])
            sample = ProbeSample.model_validate(data)
        names = {}
        for m in used:
            raw = sample.raw(m)
            name = (t.get(f"{_KEY[m]}_name") if isinstance(t, dict) else None) or (
                ",".join(raw[:3]) if m == "cell" and raw else (raw if raw and len(raw) <= 40 else f"{_KEY[m]}{i}"))
            names[_KEY[m]] = str(name)
        yield names, sample


def _csv_line(values: list[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()
