"""Cached decoding that really skips: Hugging Face `generate` on the gated model under a
calibrated threshold budget, with the skip accounting split into prefill and decoding.
`generate` keeps every HF option; the `gateskip generate` command decodes with the lean
decoder instead (gateskip.decoding: the same tokens, less per-token overhead).

A threshold budget decides per token and per module from that token's own importance,
so a single-token decode step skips as often as a long prefill does; a skipped
attention branch still writes the token's K/V (design.md section 1), so the cache
has no holes and cached decoding equals recomputing the sequence without a cache.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextStreamer

from .allocation import allocation_budget
from .budget import AllocationBudget, ThresholdBudget
from .calibrate import threshold_budget
from .errors import GateSkipError
from .flops import FlopReport, ModelDims, flop_report
from .model import is_gated
from .plan import SkipPlan
from .stats import SkipStats
from .validate import seed as seed_type
from .validate import existing_path, fits_context, integer, ratio, real, utf8_text


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


class _SplitStatsAfterPrefill(LogitsProcessor):
    """Called once per forward, after the logits: from the second forward on, the plan
    records into `decode` instead, so prefill and decoding are reported apart."""

    def __init__(self, plan: SkipPlan, decode: SkipStats):
        self.plan, self.decode = plan, decode

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.plan.stats = self.decode
        return scores


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


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    budget: float | ThresholdBudget | None = None,
    **generate_kwargs,
) -> Generation:
    """`model.generate` with skipping at a calibrated budget (batched prompts are left-padded).

    Any HF generation option passes through (do_sample, streamer, stopping_criteria, ...).
    Budget None runs the gated model without skipping (gates applied).
    """
    check_prompt(model, input_ids)
    mask = check_attention_mask(input_ids, attention_mask)
    if mask is None and input_ids.shape[0] > 1:
        refuse_unmasked_padding(model, input_ids)
    if mask is not None and not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise GateSkipError("generate runs HF generate, which continues each row after its last column: the prompts "
                            "must be left-padded (tokenizer.padding_side = 'left'); gateskip.decoding.decode takes "
                            "any padding")
    prefill, decode = SkipStats(), SkipStats()
    plan = SkipPlan(budget=decode_budget(model, budget), stats=prefill)
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(_SplitStatsAfterPrefill(plan, decode))
    out = model.generate(input_ids, attention_mask=attention_mask, skip_plan=plan, logits_processor=processors,
                         **generate_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    return Generation(sequences, input_ids.shape[1], prefill, decode, out)


# CLI ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream text from a gated model at a skip budget")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", required=True, type=existing_path, help="gate file or folder (with calibrated thresholds)")
    p.add_argument("--budget", type=ratio, default=0.0,
                   help="calibrated target skip ratio, or the net FLOP saving when the gates store allocations (0 = no skipping)")
    p.add_argument("--prompt", required=True, type=utf8_text)
    p.add_argument("--max-new-tokens", type=integer(1), default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=real(0.0, above=True), default=1.0, help="with --sample: divides the logits")
    p.add_argument("--top-k", type=integer(1), help="with --sample: only the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=real(0.0, 1.0, above=True), default=1.0,
                   help="with --sample: only the most likely tokens holding this much probability")
    p.add_argument("--seed", type=seed_type, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--speculative", type=integer(0), metavar="K", default=0,
                   help="lossless self-speculative decoding: draft K tokens at --budget, verify at full compute "
                        "(0, the default: no drafting, every token decoded once at --budget)")
    p.add_argument("--compile", action="store_true",
                   help="run each module's dense decode-step compute through torch.compile (compiles first, eager "
                        "again if that fails; slower than eager on the CPU of docs/speed.md; not with --speculative)")
    p.set_defaults(func=run)


# HF generate options that change greedy or sampled tokens and that gateskip.decoding does not
# apply, each with the values that change nothing.
NOT_APPLIED = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []), "sequence_bias": (None, {}), "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "min_p": (None, 0.0), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "exponential_decay_length_penalty": (None,),
    "num_beams": (None, 1), "guidance_scale": (None, 1.0), "stop_strings": (None, []), "max_time": (None,),
}


def check_lean_decoding(config: GenerationConfig) -> None:
    """`gateskip generate` used to run HF generate, which applies the model's generation_config;
    a config that sets an option the lean decoder lacks is refused rather than silently ignored."""
    found = [f"{name}={getattr(config, name)!r}" for name, neutral in NOT_APPLIED.items()
             if getattr(config, name, None) not in neutral]
    if found:
        raise GateSkipError(f"the model's generation_config sets {', '.join(found)}, which gateskip generate does not "
                            "apply; use gateskip.generation.generate (HF generate) from Python")


def decode_prompt(model, ids: torch.Tensor, args: argparse.Namespace, streamer=None) -> Generation:
    """`gateskip generate` without --speculative: the lean decoder, stopping where HF generate
    stopped (the model's generation_config stop tokens)."""
    from .decoding import decode

    check_lean_decoding(model.generation_config)
    sampling = {}
    if args.sample:
        sampling = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return decode(model, ids, budget=args.budget, max_new_tokens=args.max_new_tokens,
                  eos_token_id=model.generation_config.eos_token_id, streamer=streamer, compile=args.compile, **sampling)


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GateSkipError("this tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def print_reports(parts: dict[str, FlopReport]) -> None:
    for name, r in parts.items():
        label = "per generated token" if name == "decoding" else "whole generation"
        print(f"{label} ({r.tokens} tokens): {r.summary()}")


def run(args: argparse.Namespace) -> int:
    from .loading import load_model
    from .model import load_gates
    from .speculative import speculative_generate

    if args.compile and args.speculative:
        raise GateSkipError("--compile applies to plain decoding, not to --speculative: drop one of them")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    load_gates(model, args.gates)
    ids = encode_prompt(tokenizer, args.prompt, args.chat)
    check_prompt(model, ids)
    fits_context(model, ids.shape[1] + args.max_new_tokens, "the prompt plus --max-new-tokens")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.speculative:
        sampling = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        result = speculative_generate(model, ids, budget=args.budget, k=args.speculative, max_new_tokens=args.max_new_tokens,
                                      eos_token_id=tokenizer.eos_token_id, streamer=streamer, **sampling)
        print(result.summary())
        return 0
    gen = decode_prompt(model, ids, args, streamer)
    print_reports(reports(model, gen.prefill, gen.decode))
    return 0
