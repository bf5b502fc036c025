"""gateskip: learned residual gates that let a pretrained LM skip compute token by token."""

from .budget import QuantileBudget, ThresholdBudget
from .config import GateConfig
from .errors import GateSkipError
from .flops import FlopReport, ModelDims, flop_report
from .loading import load_model
from .model import add_gates, is_gated, load_gates, remove_gates, save_gates
from .plan import SkipPlan
from .stats import SkipStats

__all__ = [
    "GateConfig",
    "GateSkipError",
    "QuantileBudget",
    "ThresholdBudget",
    "SkipPlan",
    "SkipStats",
    "FlopReport",
    "ModelDims",
    "flop_report",
    "load_model",
    "add_gates",
    "remove_gates",
    "is_gated",
    "save_gates",
    "load_gates",
]
