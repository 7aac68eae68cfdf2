"""A plain-text progress line on stderr (no extra dependency; stdout stays for results)."""
from __future__ import annotations

import sys
import time


class ProgressPrinter:
    def __init__(self, stream=None, min_interval: float = 0.5):
        self.stream = stream or sys.stderr
        self.t0 = time.time()
        self.last = 0.0
        self.min_interval = min_interval
        self.stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        if stage == self.stage and done < total and now - self.last < self.min_interval:
            return
        self.last, self.stage = now, stage
        width = 24
        filled = int(width * done / total) if total else width
        bar = "#" * filled + "-" * (width - filled)
        end = "\n" if done >= total else "\r"
        self.stream.write(f"[{now - self.t0:7.1f}s] {stage:<16} [{bar}] {done}/{total}{end}")
        self.stream.flush()
