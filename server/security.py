"""Path confinement and argument size limits for every tool.

A path argument is accepted only if, after resolving every symlink and ``..``, it lies inside one
of the allowed roots (``Path.resolve`` then ``is_relative_to``). The check is made on the resolved
path, so a symlink inside a root that points outside is refused, and so is a path whose parent does
not exist yet but would resolve outside.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from es_merging.errors import InvalidInputError, PathNotAllowedError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _roots(roots: Iterable[Path]) -> list[Path]:
    out = []
    for root in roots:
        try:
            out.append(Path(root).resolve())
        except OSError:  # pragma: no cover - unreadable root
            continue
    return out


def resolve_allowed(path: str | os.PathLike[str], roots: Sequence[Path], *, what: str = "path",
                    must_exist: bool = False, kind: str | None = None) -> Path:
    """Resolve ``path`` (relative paths are taken from the current directory) and check that it
    stays inside ``roots``. ``kind`` may be ``"file"`` or ``"dir"`` to also check the type."""
    raw = os.fspath(path)
    if not raw or not raw.strip():
        raise PathNotAllowedError(f"{what}: empty path")
    if "\x00" in raw:
        raise PathNotAllowedError(f"{what}: path contains a NUL byte")
    try:
        resolved = Path(raw).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop
        raise PathNotAllowedError(f"{what} {raw!r}: cannot be resolved ({exc})") from None
    allowed = _roots(roots)
    if not any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        shown = ", ".join(str(r) for r in allowed) or "(none)"
        raise PathNotAllowedError(
            f"{what} {raw!r} resolves to {resolved}, outside the allowed roots ({shown}); "
            "move the file under one of them or start the server with --allow-root DIR"
        )
    if must_exist and not resolved.exists():
        raise PathNotAllowedError(f"{what} {raw!r} does not exist")
    if kind == "file" and resolved.exists() and not resolved.is_file():
        raise PathNotAllowedError(f"{what} {raw!r} is not a file")
    if kind == "dir" and resolved.exists() and not resolved.is_dir():
        raise PathNotAllowedError(f"{what} {raw!r} is not a directory")
    return resolved


def check_id(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InvalidInputError(value, f"not a valid {what}",
                                "use 1-64 characters from letters, digits, '.', '_' and '-', starting with a letter or digit")
    return value


def check_sizes(value: Any, *, max_list: int, max_string: int, where: str = "arguments") -> None:
    """Walk a JSON-like value and refuse any list longer than ``max_list`` or any string longer
    than ``max_string`` (so an agent learns which argument to shorten)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, str):
            if len(item) > max_string:
                raise InvalidInputError(
                    item, f"{name} is {len(item)} characters long; the limit is {max_string}",
                    "shorten it or split the work into several calls")
        elif isinstance(item, (list, tuple, set, frozenset)):
            if len(item) > max_list:
                raise InvalidInputError(
                    f"<list of {len(item)}>", f"{name} has {len(item)} items; the limit is {max_list}",
                    "split it into several calls")
            stack.extend((f"{name}[{i}]", v) for i, v in enumerate(item))
        elif isinstance(item, dict):
            if len(item) > max_list:
                raise InvalidInputError(
                    f"<mapping of {len(item)}>", f"{name} has {len(item)} entries; the limit is {max_list}",
                    "split it into several calls")
            for k, v in item.items():
                if isinstance(k, str) and len(k) > max_string:
                    raise InvalidInputError(k, f"a key in {name} is too long (limit {max_string})")
                stack.append((f"{name}.{k}", v))
        elif hasattr(item, "model_dump"):
            stack.append((name, item.model_dump()))
