"""What every decoder shares (HF generate, the lean decoder, speculative decoding): the checks
on a prompt and its mask, a budget that works one token at a time, the stop tokens, the
Generation it returns and its FLOP reports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.budget import AllocationBudget, ThresholdBudget
from ..core.flops import FlopReport, ModelDims, flop_report
from ..core.model import is_gated
from ..core.stats import SkipStats
from ..errors import GateSkipError
from .calibrate import allocation_budget
from .calibrate import threshold_budget


def decode_budget(model, budget: float | ThresholdBudget | AllocationBudget | None) -> ThresholdBudget | AllocationBudget | None:
    """A budget that works one token at a time: a calibrated ratio (a net-saving target when the
    gates store allocations), a ThresholdBudget, or an AllocationBudget with thresholds.

    Quantile budgets rank the tokens of one call, so they never skip a single decoded token.
    """
    if not is_gated(model):
        raise GateSkipError("skipping needs a model with gates (add_gates or load_gates first)")
    if budget is None or isinstance(budget, ThresholdBudget):
        return budget
    if isinstance(budget, AllocationBudget) and budget.thresholds is not None:
        return budget
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if model.gate_bank.allocations:
            return allocation_budget(model, budget, decoding=True)
        return threshold_budget(model, budget)
    raise GateSkipError(f"decoding needs a calibrated ratio or a ThresholdBudget, got {budget!r} (quantile budgets do not skip single tokens)")


def stop_tokens(eos_token_id: int | list[int] | None) -> set[int]:
    """The stop tokens an `eos_token_id` names (HF allows one id, a list, or none)."""
    if eos_token_id is None:
        return set()
    ids = eos_token_id
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist() if not ids.dtype.is_floating_point else None
    ids = [ids] if isinstance(ids, int) else ids
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids):
        raise GateSkipError(f"eos_token_id must be a token id, a list of them or None, got {eos_token_id!r}")
    return set(ids)


def check_prompt(model, input_ids: torch.Tensor) -> None:
    """Clear errors for prompts the model cannot continue: input_ids must be a (batch, tokens)
    tensor of token ids of this model's vocabulary, shorter than its context."""
    if not isinstance(input_ids, torch.Tensor):
        raise GateSkipError(f"input_ids must be a tensor of token ids (batch, tokens), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise GateSkipError(f"input_ids must be a 2-D tensor (batch, tokens), got shape {tuple(input_ids.shape)}; "
                            "for one prompt use ids[None] or ids.unsqueeze(0)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise GateSkipError("the prompt is empty: give at least one token")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise GateSkipError(f"input_ids must hold token ids (an integer tensor), got {input_ids.dtype}")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) if hasattr(model, "get_input_embeddings") else None
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        raise GateSkipError(f"input_ids holds token id {low if low < 0 else high}, outside this model's vocabulary "
                            f"of {vocab} tokens")
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and input_ids.shape[1] >= context:
        raise GateSkipError(f"the prompt has {input_ids.shape[1]} tokens, but the model's context is {context} tokens")


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """An attention mask of 0/1 of input_ids' shape, every row holding at least one real token; as bool."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise GateSkipError(f"attention_mask must be a tensor of 0 and 1, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise GateSkipError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                            f"{tuple(input_ids.shape)}: give one 0 or 1 per token")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise GateSkipError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    mask = attention_mask.bool()
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise GateSkipError(f"row {empty[0]} of attention_mask is all padding: a prompt needs at least one real token")
    return mask


def refuse_unmasked_padding(model, input_ids: torch.Tensor) -> None:
    """A batch without an attention mask is taken as unpadded: one whose rows begin or end with the
    model's pad token is refused rather than decoded with the padding read as text."""
    pads = {getattr(getattr(model, "generation_config", None), "pad_token_id", None),
            getattr(model.config, "pad_token_id", None)}
    pads = {p for p in pads if isinstance(p, int)}
    if not pads:
        return
    pad = torch.tensor(sorted(pads), device=input_ids.device)
    edges = torch.isin(input_ids[:, 0], pad) | torch.isin(input_ids[:, -1], pad)
    if bool(edges.any()):
        row = int(edges.nonzero()[0])
        raise GateSkipError(f"row {row} of input_ids begins or ends with the pad token, but no attention_mask was "
                            "given: pass the tokenizer's attention_mask")


@dataclass
class Generation:
    sequences: torch.Tensor  # (B, prompt + new), as HF generate returns them
    prompt_length: int
    prefill: SkipStats
    decode: SkipStats
    output: object  # what HF generate returned (scores, logits, ... with return_dict_in_generate)


def combine(a: FlopReport, b: FlopReport) -> FlopReport:
    """One report for two parts of a run (every field is a sum; the paper's fraction is
    per token x module, and each token has the same number of modules)."""
    tokens = a.tokens + b.tokens
    fraction = (a.paper_fraction * a.tokens + b.paper_fraction * b.tokens) / tokens if tokens else 0.0
    return FlopReport(
        tokens=tokens,
        paper_fraction=fraction,
        dense_flops=a.dense_flops + b.dense_flops,
        skipped_flops=a.skipped_flops + b.skipped_flops,
        gate_flops=a.gate_flops + b.gate_flops,
        head_flops=a.head_flops + b.head_flops,
    )


def reports(model, prefill: SkipStats, decode: SkipStats) -> dict[str, FlopReport]:
    """FLOP reports for the decoded tokens alone and for the whole generation."""
    dims, config = ModelDims.from_config(model.config), model.gate_bank.config
    per_token = flop_report(decode, dims, config)
    return {"decoding": per_token, "generation": combine(flop_report(prefill, dims, config), per_token)}
