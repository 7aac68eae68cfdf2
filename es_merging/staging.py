"""Write a directory so that it appears whole or not at all.

The block writes into a temporary sibling of ``out``; only when it succeeds does the sibling take
``out``'s place (an existing ``out`` is moved aside first and removed after, so ``out`` is never
missing for longer than two renames). On any exception — KeyboardInterrupt and cancellation
included — the sibling is removed and ``out`` is left as it was. Callers decide beforehand whether
an existing ``out`` may be replaced (their messages differ: merge, zoo build, adaptation)."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
