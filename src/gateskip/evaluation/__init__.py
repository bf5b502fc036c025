"""Evaluation: lm-eval sweeps of accuracy against compute saved, for GateSkip and baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .metrics import summarize
from .sweep import Sweep, SweepSettings, parse_budgets, run_sweep

if TYPE_CHECKING:
    from .harness import GatedLM


def __getattr__(name: str):
    # GatedLM subclasses lm-eval's HFLM, and lm-eval takes seconds to import: only on first use (PEP 562).
    if name != "GatedLM":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .harness import GatedLM

    globals()["GatedLM"] = GatedLM
    return GatedLM


__all__ = ["GatedLM", "Sweep", "SweepSettings", "parse_budgets", "run_sweep", "summarize"]
