"""The skip plan (what the caller wants) and the forward context (one call's state).

A SkipPlan is passed to the model's forward (`model(ids, skip_plan=plan)`) or to
`generate`. Each forward turns it into a ForwardContext that travels down to the
decoder layers as a keyword argument: nothing is stored on modules between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import GateSkipError
from .budget import Budget, as_budget
from .gates import GateBank, importance
from .stats import SkipStats

EXECUTIONS = ("masked", "physical")
ATTENTIONS = ("auto", "sdpa", "flex")


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
    attention: the kernel physical execution's kept queries attend with: "sdpa" (explicit
        mask), "flex" (FlexAttention with a block mask from the kept positions, compiled on a
        GPU), "auto" (flex on CUDA, else sdpa).
    """

    budget: Budget | float | None = None
    execution: str = "physical"
    apply_gates: bool = True
    skip_bos: bool | None = None
    stats: SkipStats | None = None
    trace: GateTrace | None = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        self.budget = as_budget(self.budget)
        if self.stats is not None and not isinstance(self.stats, SkipStats):
            raise GateSkipError(f"SkipPlan stats must be a gateskip.SkipStats (filled in place) or None, "
                                f"got {type(self.stats).__name__}")
        if self.trace is not None and not isinstance(self.trace, GateTrace):
            raise GateSkipError(f"SkipPlan trace must be a GateTrace or None, got {type(self.trace).__name__}")
        for name in ("apply_gates",) + (("skip_bos",) if self.skip_bos is not None else ()):
            if not isinstance(getattr(self, name), bool):
                raise GateSkipError(f"SkipPlan {name} must be True or False, got {getattr(self, name)!r}")
        if self.attention not in ATTENTIONS:
            raise GateSkipError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.execution not in EXECUTIONS:
            raise GateSkipError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if self.budget is not None and not self.apply_gates:
            raise GateSkipError("skipping ranks tokens by their gates: a budget needs apply_gates=True")


@dataclass(frozen=True)
class Decision:
    """What one gated module does in one forward, decided before its branch runs.

    scale: multiplies the kept outputs (soft gates: the gate values; unit gates in training:
        the straight-through factor, exactly 1 forward); None adds them unscaled.
    keep: (B, T) tokens that run the branch; None when every token does (no mask to apply).
    packed: physical execution with some token skipped: gather the kept tokens, run, scatter.
    capacity: most tokens any sequence keeps here, when known without the device.
    removed: physical execution where no token runs the branch: nothing to compute at all.
    """

    scale: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    packed: bool = False
    capacity: int | None = None
    removed: bool = False


UNGATED = Decision()


def unit_factor(g: torch.Tensor) -> torch.Tensor | None:
    """Straight-through factor of unit gates: 1 + (imp - imp.detach()) / imp.detach() is exactly 1
    in the forward and gives the gate the gradient of scaling its branch (that of imp / imp.detach());
    the floor on the divisor keeps a token whose gate underflowed to 0 from making 0 / 0 = NaN.
    None (no multiply) when no gradient is taken."""
    if not g.requires_grad:
        return None
    imp = importance(g).unsqueeze(-1)
    return (1 + (imp - imp.detach()) / imp.detach().clamp_min(torch.finfo(imp.dtype).tiny)).to(g.dtype)


def _check_budget_modules(budget, bank: GateBank) -> None:
    """A budget whose per-module tables name modules these gates do not have was made for another
    model (or another gate layout): refused rather than applied where its names happen to match."""
    tables = [getattr(budget, name, None) for name in ("thresholds", "ratios")]
    named = {k for t in tables if t is not None for k in t}
    if named:
        unknown = named - set(bank.module_keys())
        if unknown:
            raise GateSkipError(f"the budget names module {sorted(unknown)[0]}, which this model's gates do not have "
                                "(thresholds or an allocation made for another model?)")


@dataclass
class ForwardContext:
    """One forward call's view of the plan: which tokens are real, how much context each sees."""

    plan: SkipPlan
    bank: GateBank | None
    valid: torch.Tensor  # (B, T) bool: not padding
    context: torch.Tensor  # (B, T) float: keys each query attends to (for FLOP accounting)
    protect: torch.Tensor | None  # (B, T) bool: tokens that are never skipped
    counts: tuple[list[int], list[int]] | None = None  # per sequence (real, protected) tokens, when known ahead
    # A step of gateskip.inference.decoding: one token per row attending to its cache; every module runs on the
    # rows that keep it, through gateskip.core.execution's step functions (HF's attention is not called).
    # Its cache is read under the plan that writes it until a full-compute pass rewrites it (a
    # speculative verify), so a removed attention module's keys, which no query reads, are not written.
    decode_step: bool = False
    kernels: object | None = None  # a decode step's execution.StepKernels (None: eager)

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
        if bank is not None and plan.budget is not None:
            _check_budget_modules(plan.budget, bank)
        counts = None
        if plan.budget is not None and plan.budget.known_ahead:
            if attention_mask is None:  # every token real: the counts need no look at the device
                counts = [length] * batch, [int(protect is not None and past_length == 0)] * batch
            else:  # one wait for the device per forward instead of several per module
                guarded = valid & protect if protect is not None else torch.zeros_like(valid)
                counts = tuple(torch.stack([valid.sum(1), guarded.sum(1)]).tolist())
        return cls(plan, bank if plan.apply_gates else None, valid, context, protect, counts)

    @property
    def physical(self) -> bool:
        return self.plan.execution == "physical"

    def removes(self, branch: str, layer: int) -> bool:
        """Whether no token runs this module in this forward (physical execution, ratio 1, no
        protected token): it needs no input, only the keys a cache may want of it."""
        budget = self.plan.budget
        return (self.physical and self.protect is None and budget is not None and self.bank is not None
                and budget.fixed(f"{branch}.{layer}") is False and self.bank.get(branch, layer) is not None)

    def decide(self, branch: str, layer: int, x: torch.Tensor | None, needs_keys: bool = False) -> Decision:
        """Evaluate a module's gate where one is needed and decide which tokens run its branch.

        x is the branch input (None where `removes` says no token runs the module); needs_keys
        says that a cache wants this attention module's keys and values even if no token runs it."""
        gate = None if self.bank is None else self.bank.get(branch, layer)
        if gate is None:
            return UNGATED
        key, budget, unit = f"{branch}.{layer}", self.plan.budget, self.bank.config.unit
        fixed = True if budget is None else budget.fixed(key)
        # A gate is evaluated only where it decides or scales, or where training reads it.
        evaluate = fixed is None or (fixed and not unit) or (fixed is not False and self.plan.trace is not None)
        g = gate(x) if evaluate else None
        if fixed is True:
            keep = self.valid
        elif fixed is False:
            keep = self.valid & self.protect if self.protect is not None else torch.zeros_like(self.valid)
        else:
            keep = budget.keep(importance(g), self.valid, self.protect, key)
        removed = self.removes(branch, layer)
        if self.plan.stats is not None:
            self.plan.stats.record_module(key, self.valid, keep, self.context, gated=g is not None,
                                          kv_skipped=removed and branch == "attn" and not needs_keys)
        if self.plan.trace is not None and g is not None:
            self.plan.trace.entries.append((key, g, self.valid))
        scale = None if g is None else unit_factor(g) if unit else g
        if fixed is True:
            return Decision(scale, None)
        if not self.physical:
            return Decision(scale, keep)
        if removed:
            return Decision(None, keep, removed=True)
        capacity = skips = None
        if self.counts is not None:
            kept = budget.kept_counts(*self.counts, key)
            capacity, skips = max(kept, default=0), any(k < n for k, n in zip(kept, self.counts[0]))
        if skips is None:
            skips = not bool(keep.all())  # waits for the device
        return Decision(scale, keep, packed=True, capacity=capacity) if skips else Decision(scale, None)
