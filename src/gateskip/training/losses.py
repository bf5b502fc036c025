"""Training losses: language-model cross-entropy, gate sparsity, distillation to the base model.

total = lm + sparsity_weight * sparsity + distill_weight * distill

The sparsity loss reads the gate values that a masked forward records in a GateTrace,
so it sees exactly the gates that scaled the branch outputs. Padding never counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.plan import GateTrace
from ..data.textdata import IGNORE
from ..errors import GateSkipError

SPARSITY_KINDS = ("l2", "l1", "kl")


def check_sparsity_kind(kind: str) -> str:
    if kind not in SPARSITY_KINDS:
        raise GateSkipError(f"unknown sparsity loss {kind!r}; choose one of {', '.join(SPARSITY_KINDS)}")
    return kind


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not IGNORE.

    labels are aligned with the inputs (B, T); the shift happens here."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)


def _bernoulli_kl(target: float, g: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(target) || Bernoulli(g)) elementwise; pulls each gate towards `target`."""
    eps = 1e-6
    g = g.clamp(eps, 1 - eps)
    t = torch.tensor(target, dtype=g.dtype, device=g.device)
    return torch.xlogy(t, t) - t * torch.log(g) + torch.xlogy(1 - t, 1 - t) - (1 - t) * torch.log1p(-g)


def gate_penalty(g: torch.Tensor, kind: str, target: float) -> torch.Tensor:
    """Per-element penalty of gate values: g^2 (l2), g (l1, gates are positive) or Bernoulli KL."""
    if kind == "l2":
        return g * g
    if kind == "l1":
        return g
    return _bernoulli_kl(target, g)


def _per_module_means(trace: GateTrace, fn) -> torch.Tensor:
    """Mean of fn(gate values) over valid tokens and dims, per module: (modules,).

    Each module's values are first summed over dims, so only small (B, T) tensors are stacked:
    a few kernels per module instead of a dozen (the loss runs on every module every step)."""
    if not trace.entries:
        raise GateSkipError("no gate values were traced: run the model with SkipPlan(trace=GateTrace())")
    sums = torch.stack([fn(g.float()).sum(-1) for _, g, _ in trace.entries])  # (M, B, T)
    valid = torch.stack([v for _, _, v in trace.entries]).to(sums.dtype)
    width = trace.entries[0][1].shape[-1]
    return (sums * valid).sum((1, 2)) / (valid.sum((1, 2)) * width).clamp_min(1)


def sparsity_loss(trace: GateTrace, kind: str = "l2", target: float = 0.0) -> torch.Tensor:
    """Gate penalty averaged over valid tokens and dims of each module, then over modules."""
    check_sparsity_kind(kind)
    return _per_module_means(trace, lambda g: gate_penalty(g, kind, target)).mean()


def mean_gate(trace: GateTrace) -> torch.Tensor:
    """Mean gate value over valid tokens, dims and modules (a number to watch, not a loss)."""
    with torch.no_grad():
        return _per_module_means(trace, lambda g: g).mean()


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, averaged over positions that carry loss."""
    keep = labels[:, 1:] != IGNORE
    s = F.log_softmax(student_logits[:, :-1].float(), dim=-1)[keep]
    t = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)[keep]
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


@dataclass
class LossTerms:
    """Every term of one micro-batch, kept apart so each can be logged."""

    total: torch.Tensor
    lm: torch.Tensor
    sparsity: torch.Tensor
    distill: torch.Tensor
    mean_gate: torch.Tensor

    def detached(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "lm", "sparsity", "distill", "mean_gate")}


def combine(
    logits: torch.Tensor,
    labels: torch.Tensor,
    trace: GateTrace,
    *,
    sparsity_weight: float,
    sparsity_kind: str = "l2",
    sparsity_target: float = 0.0,
    teacher_logits: torch.Tensor | None = None,
    distill_weight: float = 0.0,
) -> LossTerms:
    """All loss terms of one forward (student logits, its gate trace, optional teacher logits)."""
    lm = lm_loss(logits, labels)
    sparsity = sparsity_loss(trace, sparsity_kind, sparsity_target)
    distill = distill_loss(logits, teacher_logits, labels) if teacher_logits is not None else lm.new_zeros(())
    total = lm + sparsity_weight * sparsity + distill_weight * distill
    return LossTerms(total, lm, sparsity, distill, mean_gate(trace))
