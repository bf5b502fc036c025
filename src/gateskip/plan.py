"""The skip plan (what the caller wants) and the forward context (one call's state).

A SkipPlan is passed to the model's forward (`model(ids, skip_plan=plan)`) or to
`generate`. Each forward turns it into a ForwardContext that travels down to the
decoder layers as a keyword argument: nothing is stored on modules between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .budget import Budget, QuantileBudget, as_budget
from .errors import GateSkipError
from .gates import Gate, GateBank, importance
from .stats import SkipStats

EXECUTIONS = ("masked", "physical")


class GateTrace:
    """Gate values of one forward, collected for losses: (module key, values, valid mask).

    A plain class on purpose: DDP and FSDP rebuild dataclass arguments of forward on the
    way in (torch.distributed.utils._apply_to_tensors), so a dataclass trace would be
    filled as a copy and the caller's would stay empty.
    """

    def __init__(self, entries: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None):
        self.entries = [] if entries is None else entries


@dataclass
class SkipPlan:
    """What a forward should do.

    budget: None (skip nothing), a ratio (per-sequence quantile), or a Budget.
    execution: "masked" computes every token and zeroes skipped outputs (training);
        "physical" removes skipped tokens before the branch runs (inference).
    apply_gates: scale branch outputs by their gates. False with no budget runs the
        original model through the gated code path.
    skip_bos: whether the first token of a sequence may be skipped; None takes the gates'
        own setting (GateConfig.skip_bos).
    stats: filled in place with what was computed and skipped.
    trace: filled with gate values (used by the training losses).
    """

    budget: Budget | float | None = None
    execution: str = "physical"
    apply_gates: bool = True
    skip_bos: bool | None = None
    stats: SkipStats | None = None
    trace: GateTrace | None = None

    def __post_init__(self) -> None:
        self.budget = as_budget(self.budget)
        if self.execution not in EXECUTIONS:
            raise GateSkipError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.budget is not None and not self.apply_gates:
            raise GateSkipError("skipping ranks tokens by their gates: a budget needs apply_gates=True")


@dataclass
class ForwardContext:
    """One forward call's view of the plan: which tokens are real, how much context each sees."""

    plan: SkipPlan
    bank: GateBank | None
    valid: torch.Tensor  # (B, T) bool: not padding
    context: torch.Tensor  # (B, T) float: keys each query attends to (for FLOP accounting)
    protect: torch.Tensor | None  # (B, T) bool: tokens that are never skipped
    capacity: int | None = None  # most tokens any sequence keeps in a module, when known ahead
    skips: bool | None = None  # whether any module skips any token, when known ahead

    @classmethod
    def build(
        cls,
        plan: SkipPlan,
        bank: GateBank | None,
        batch: int,
        length: int,
        attention_mask: torch.Tensor | None,
        past_length: int,
        device: torch.device,
    ) -> "ForwardContext":
        if attention_mask is None:
            keys = torch.ones(batch, past_length + length, dtype=torch.bool, device=device)
        elif attention_mask.dim() == 2:
            keys = attention_mask.to(device=device).bool()
        else:
            raise GateSkipError("gated forward needs a 2-D attention mask (batch, keys) or none")
        valid = keys[:, -length:]
        context = keys.cumsum(1)[:, -length:].float()
        protect = None
        skip_bos = plan.skip_bos if plan.skip_bos is not None else (bank is None or bank.config.skip_bos)
        if not skip_bos:
            first = keys.int().argmax(1) - (keys.shape[1] - length)  # first real token, relative to this call
            positions = torch.arange(length, device=device)
            protect = positions[None, :] == first[:, None]
        if plan.stats is not None:
            plan.stats.record_forward(valid, context)
        capacity = skips = None
        if isinstance(plan.budget, QuantileBudget) and plan.budget.scope == "sequence":
            if attention_mask is None:  # every token real: the counts need no look at the device
                real, protected = [length] * batch, [int(protect is not None and past_length == 0)] * batch
            else:  # one wait for the device per forward instead of several per module
                guarded = valid & protect if protect is not None else torch.zeros_like(valid)
                real, protected = torch.stack([valid.sum(1), guarded.sum(1)]).tolist()
            kept = plan.budget.kept_counts(real, protected)
            capacity, skips = max(kept, default=0), any(k < n for k, n in zip(kept, real))
        return cls(plan, bank if plan.apply_gates else None, valid, context, protect, capacity, skips)

    @property
    def physical(self) -> bool:
        return self.plan.execution == "physical"

    def gate(self, branch: str, layer: int) -> Gate | None:
        return None if self.bank is None else self.bank.get(branch, layer)

    def decide(self, key: str, gate_values: torch.Tensor | None) -> torch.Tensor | None:
        """Keep mask (B, T) of a module, or None where the module is not gated (nothing skipped)."""
        if gate_values is None:
            return None
        budget = self.plan.budget
        if budget is None:
            keep = self.valid
        else:
            keep = budget.keep(importance(gate_values), self.valid, self.protect, key)
        if self.plan.stats is not None:
            self.plan.stats.record_module(key, self.valid, keep, self.context)
        if self.plan.trace is not None:
            self.plan.trace.entries.append((key, gate_values, self.valid))
        return keep
