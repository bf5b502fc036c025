"""Budget policies: which tokens skip a gated module, given their importance.

Every policy returns a keep mask over (batch, time). Padding is never kept and
never counted; protected tokens (e.g. BOS when it may not be skipped) are always kept.

A policy also says, per module and before any gate runs, whether the module is fixed:
`fixed(key)` is True when every token runs it (ratio 0), False when every skippable token
skips it (ratio 1), None when the gates decide. Fixed modules evaluate no gate (unit gates),
and a module every token skips runs nothing at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Union

import torch

from ..errors import GateSkipError

SCOPES = ("sequence", "batch")


def check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or math.isnan(ratio) or not 0.0 <= ratio <= 1.0:
        raise GateSkipError(f"budget must be a skip ratio in [0, 1], got {ratio!r}")
    return float(ratio)


def check_thresholds(thresholds, what: str = "thresholds") -> None:
    """A mapping of module keys to numbers; -inf (skip none) and inf (skip all) are allowed, NaN is
    not (every comparison with it is False: the module would skip every token)."""
    if not isinstance(thresholds, Mapping):
        raise GateSkipError(f"{what} must map module keys (e.g. 'attn.0') to numbers, got {type(thresholds).__name__}")
    for key, value in thresholds.items():
        if not isinstance(key, str):
            raise GateSkipError(f"{what}: module keys are strings like 'attn.0', got {key!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise GateSkipError(f"{what}: the threshold of {key} must be a number (not NaN), got {value!r}")


@dataclass(frozen=True)
class QuantileBudget:
    """Skip the floor(ratio * n) least important valid tokens of each sequence (or of the
    whole batch with scope="batch", the paper's pooling). Exact counts rather than a
    quantile value, so ties cannot push the skip fraction off the budget."""

    ratio: float
    scope: str = "sequence"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.scope not in SCOPES:
            raise GateSkipError(f"quantile scope must be one of {SCOPES}, got {self.scope!r}")

    @property
    def known_ahead(self) -> bool:
        """Whether kept counts follow from the padding alone (not with batch pooling, where a
        sequence's count depends on the others' importances)."""
        return self.scope == "sequence"

    def fixed(self, key: str) -> bool | None:
        return _fixed(self.ratio)

    def kept_counts(self, valid: list[int], protected: list[int], key: str = "") -> list[int]:
        """Tokens each sequence keeps (what `keep` will yield), known from the padding alone, so
        physical execution can size its buffers without waiting for the device (scope="sequence")."""
        return [n - min(math.floor(n * self.ratio + 1e-9), n - p) for n, p in zip(valid, protected)]

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        if self.ratio == 0.0:
            return valid
        shape = imp.shape
        if self.scope == "batch":
            imp, valid = imp.reshape(1, -1), valid.reshape(1, -1)
            protect = None if protect is None else protect.reshape(1, -1)
        skippable = valid if protect is None else valid & ~protect
        n_skip = torch.floor(valid.sum(1).double() * self.ratio + 1e-9).long()
        n_skip = torch.minimum(n_skip, skippable.sum(1))
        scores = imp.float().masked_fill(~skippable, float("inf"))
        order = torch.argsort(scores, dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        keep = valid & (rank >= n_skip[:, None])
        return keep.reshape(shape)


@dataclass(frozen=True)
class ThresholdBudget:
    """Skip a token iff its importance is below its module's calibrated threshold.
    Causal and batch-independent, so it also skips in single-token decoding."""

    thresholds: Mapping[str, float] = field(default_factory=dict)
    ratio: float | None = None  # the target ratio the thresholds were calibrated for (a label)

    def __post_init__(self) -> None:
        check_thresholds(self.thresholds, "ThresholdBudget thresholds")
        if self.ratio is not None:
            check_ratio(self.ratio)

    @property
    def known_ahead(self) -> bool:
        return False

    def fixed(self, key: str) -> bool | None:
        t = self.thresholds.get(key)
        return True if t == -math.inf else False if t == math.inf else None

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        return _threshold_keep(self.thresholds, imp, valid, protect, key)


def _threshold_keep(thresholds: Mapping[str, float], imp: torch.Tensor, valid: torch.Tensor,
                    protect: torch.Tensor | None, key: str) -> torch.Tensor:
    if key not in thresholds:
        raise GateSkipError(f"no calibrated threshold for module {key!r}; calibrate the model for this budget first")
    keep = valid & (imp >= thresholds[key])
    return keep if protect is None else keep | (valid & protect)


@dataclass(frozen=True)
class AllocationBudget:
    """One net-saving target for the whole model, split into a skip ratio per module
    (gateskip.search.allocation finds the split). Ratio 1 removes a module for every token, 0 leaves it
    whole; in between the gates pick the tokens: a per-sequence quantile at the module's ratio
    (prefill, scoring), or, when `thresholds` are given, the module's calibrated threshold
    (cached decoding: causal, one token at a time)."""

    ratios: Mapping[str, float]
    target: float  # the net FLOP saving the ratios were chosen for (a label)
    thresholds: Mapping[str, float] | None = None

    def __post_init__(self) -> None:
        check_ratio(self.target)
        if not isinstance(self.ratios, Mapping):
            raise GateSkipError(f"AllocationBudget ratios must map module keys to skip ratios, got "
                                f"{type(self.ratios).__name__}")
        for r in self.ratios.values():
            check_ratio(r)
        if self.thresholds is not None:
            check_thresholds(self.thresholds, "AllocationBudget thresholds")

    @property
    def known_ahead(self) -> bool:
        return self.thresholds is None

    def ratio(self, key: str) -> float:
        return self.ratios.get(key, 0.0)

    def fixed(self, key: str) -> bool | None:
        return _fixed(self.ratio(key))

    def kept_counts(self, valid: list[int], protected: list[int], key: str = "") -> list[int]:
        return QuantileBudget(self.ratio(key)).kept_counts(valid, protected)

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        if self.thresholds is None:
            return QuantileBudget(self.ratio(key)).keep(imp, valid, protect, key)
        return _threshold_keep(self.thresholds, imp, valid, protect, key)


def _fixed(ratio: float) -> bool | None:
    return True if ratio == 0.0 else False if ratio == 1.0 else None


Budget = Union[QuantileBudget, ThresholdBudget, AllocationBudget]


def as_budget(budget: "Budget | float | None") -> Budget | None:
    """Accept a bare ratio as shorthand for the default per-sequence quantile budget."""
    if budget is None or isinstance(budget, (QuantileBudget, ThresholdBudget, AllocationBudget)):
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        return QuantileBudget(check_ratio(budget))
    raise GateSkipError(f"a budget is a ratio in [0, 1] or a budget policy (gateskip.core.budget), got {budget!r}")
