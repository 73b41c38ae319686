"""Rule configuration: `schemas/anomaly_rules.toml`, defaults for every branch and overrides per branch.

The thresholds of the defaults come from ../shared/reference/domain.md §4 (docs/anomalies.md lists them).
A branch's table is merged key by key over the defaults, so a branch overrides one threshold without
repeating the others.
"""

from __future__ import annotations

import copy
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard.errors import ConfigError
from guard.records.codec import schemas_dir

RULE_SECTIONS = ("bulk_access", "first_access", "principal", "business_hours", "contact_takeover", "deletion",
                 "pipeline", "transfer", "delivery")


def default_rules_path() -> Path:
    return Path(os.environ.get("GUARD_ANOMALY_RULES") or schemas_dir() / "anomaly_rules.toml")


class RuleConfig:
    """The rules' settings per branch (a branch without its own table gets the defaults)."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.defaults: dict[str, Any] = dict(doc.get("defaults") or {})
        unknown = set(k for k, v in self.defaults.items() if isinstance(v, dict)) - set(RULE_SECTIONS)
        if unknown:
            raise ConfigError(f"unknown rule sections in the anomaly rules: {', '.join(sorted(unknown))}")
        self.branches: dict[str, dict[str, Any]] = {str(k): dict(v) for k, v in (doc.get("branches") or {}).items()}
        self._cache: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> RuleConfig:
        p = Path(path) if path else default_rules_path()
        try:
            return cls(tomllib.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ConfigError(f"anomaly rules file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"anomaly rules file {p} is not valid TOML: {exc}") from None

    def for_branch(self, branch: str) -> dict[str, Any]:
        """The merged settings of `branch` (defaults, then the branch's own keys)."""
        cached = self._cache.get(branch)
        if cached is None:
            cached = self._cache[branch] = _merge(self.defaults, self.branches.get(branch, {}))
        return cached

    def rule(self, branch: str, section: str) -> dict[str, Any]:
        return dict(self.for_branch(branch).get(section) or {})


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
