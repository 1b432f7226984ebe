"""Promotion gates: may a candidate model replace the current champion? Pure functions, one decision record.

Absolute thresholds (ECE ≤, Brier ≤, accuracy ≥) and changes relative to the champion (ECE and Brier may
not grow by more than a fraction of the champion's, accuracy may not drop by more than a fraction of it).
With no champion yet only the absolute thresholds apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

from caopd.config.gates import GateConfig, GateMode


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    limit: float
    passed: bool


@dataclass(frozen=True)
class GateDecision:
    mode: GateMode
    passed: bool
    checks: tuple[Check, ...]
    champion_version: str | None

    def as_dict(self) -> dict:
        return {"mode": self.mode, "passed": self.passed, "champion_version": self.champion_version,
                "checks": [asdict(c) for c in self.checks]}


def _at_most(name: str, value: float, limit: float) -> Check:
    return Check(name, value, limit, value <= limit + 1e-12)


def _at_least(name: str, value: float, limit: float) -> Check:
    return Check(name, value, limit, value >= limit - 1e-12)


def evaluate_gates(candidate: Mapping[str, float], champion: Mapping[str, float] | None, cfg: GateConfig,
                   champion_version: str | None = None) -> GateDecision:
    """The checks that apply, each with its value and limit; ``passed`` when all pass (always with mode disabled)."""
    if cfg.mode == "disabled":
        return GateDecision("disabled", True, (), champion_version)
    checks = []
    if cfg.max_ece is not None:
        checks.append(_at_most("ece", candidate["ece"], cfg.max_ece))
    if cfg.max_brier is not None:
        checks.append(_at_most("brier", candidate["brier"], cfg.max_brier))
    if cfg.min_accuracy is not None:
        checks.append(_at_least("accuracy", candidate["accuracy"], cfg.min_accuracy))
    if champion is not None:
        checks.append(_at_most("ece_vs_champion", candidate["ece"], champion["ece"] * (1 + cfg.max_ece_increase)))
        checks.append(_at_most("brier_vs_champion", candidate["brier"],
                               champion["brier"] * (1 + cfg.max_brier_increase)))
        checks.append(_at_least("accuracy_vs_champion", candidate["accuracy"],
                                champion["accuracy"] * (1 - cfg.max_accuracy_drop)))
    return GateDecision(cfg.mode, all(c.passed for c in checks), tuple(checks), champion_version)
