"""Progress lines for the evaluation's long stretches (the sliding pass, TTT, the audits): one
line every ``every`` seconds, to the ``proteus`` logger (plain lines, never a bar: the run's
log and a redirected stdout stay readable)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class Progress:
    """``tick(done)`` logs ``  {what} {done}/{total} ({rate}/s)`` when ``every`` seconds have
    passed since the last line; nothing when not ``enabled``."""

    def __init__(self, what: str, total: int, enabled: bool = True, every: float = 10.0,
                 unit: str = ""):
        self.what, self.total, self.enabled = what, total, enabled
        self.every, self.unit = every, unit
        self.t0 = self.last = time.perf_counter()

    def tick(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        unit = f" {self.unit}" if self.unit else ""
        log.info(f"  {self.what} {done:,}/{self.total:,}{unit} ({rate:,.1f}{unit}/s, "
                 f"{now - self.t0:.0f} s){'; ' + note if note else ''}")
