"""A doctor's finding (`Check`) and the logger its probing clients write to (none of their noise is news)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

#: The logger of the checks' own Kafka clients: a refused or unanswered probe is the finding, not noise.
probe_logger = logging.getLogger("guard.doctor.probe")
probe_logger.addHandler(logging.NullHandler())
probe_logger.propagate = False


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, whether it passed, what was seen, and what to do if not."""

    name: str
    ok: bool
    detail: str
    action: str = ""

    def line(self) -> str:
        text = f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"
        return text if self.ok or not self.action else f"{text}\n      do: {self.action}"
