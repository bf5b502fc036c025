"""gateskip: learned residual gates that let a pretrained LM skip compute token by token."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from .budget import QuantileBudget, ThresholdBudget
from .config import GateConfig
from .errors import GateSkipError
from .flops import FlopReport, ModelDims, flop_report
from .plan import SkipPlan
from .stats import SkipStats

if TYPE_CHECKING:
    from .loading import load_model
    from .model import add_gates, is_gated, load_gates, remove_gates, save_gates

# Imported on first use (PEP 562): these modules import transformers' modelling stack, which
# takes seconds (it imports torchao too), and `gateskip --help` or a light command needs none of it.
_LAZY = {"load_model": "loading", **{n: "model" for n in ("add_gates", "is_gated", "load_gates", "remove_gates", "save_gates")}}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _TorchaoImportNoise(logging.Filter):
    """Drops the two warnings torchao's import logs on a machine without its CUDA kernels.

    transformers imports torchao whenever it is installed, so every command that loads a model
    would otherwise open with "Failed to load .../torchao/_C*.so" lines and torch's notice that
    torchao's enums need no pytree registration; neither says anything a gateskip user can act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "torchao":
            return not str(record.msg).startswith("Failed to load ")
        enum = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return not (str(record.msg).startswith("%s is an Enum subclass")
                    and getattr(enum, "__module__", "").startswith("torchao."))


for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).addFilter(_TorchaoImportNoise())

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
