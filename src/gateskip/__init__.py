"""gateskip: learned residual gates that let a pretrained LM skip compute token by token."""

from __future__ import annotations

import logging

from .core.budget import AllocationBudget, QuantileBudget, ThresholdBudget
from .core.config import GateConfig
from .core.flops import FlopReport, ModelDims, flop_report
from .core.model import add_gates, is_gated, load_gates, remove_gates, save_gates
from .core.plan import SkipPlan
from .core.stats import SkipStats
from .errors import GateSkipError
from .loading import load_model


class _TorchaoImportNoise(logging.Filter):
    """Drops the warnings torchao's import logs about itself, nothing else.

    transformers imports torchao whenever it is installed, so every command that loads a model
    would otherwise open with "Failed to load .../torchao/_C*.so" (prebuilt kernels for another
    Python or GPU) and torch's deprecation notice for torchao's enum pytree registration: noise
    a gateskip user can do nothing about. Quantising with torchao works without those kernels.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":
            return not str(record.msg).startswith("Failed to load ")
        enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("%s is an Enum subclass")
                    and getattr(enum, "__module__", "").startswith("torchao."))


logging.getLogger("torchao").addFilter(_TorchaoImportNoise())
logging.getLogger("torch.utils._pytree").addFilter(_TorchaoImportNoise())

__all__ = [
    "GateConfig",
    "GateSkipError",
    "QuantileBudget",
    "AllocationBudget",
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
