"""Evaluation: lm-eval sweeps of accuracy against compute saved, for GateSkip and baselines."""

from .harness import GatedLM
from .metrics import summarize
from .sweep import Sweep, SweepSettings, parse_budgets, run_sweep

__all__ = ["GatedLM", "Sweep", "SweepSettings", "parse_budgets", "run_sweep", "summarize"]
