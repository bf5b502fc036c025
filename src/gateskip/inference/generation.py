"""Cached decoding that really skips: Hugging Face `generate` on the gated model under a
calibrated threshold budget, with the skip accounting split into prefill and decoding.
`generate` keeps every HF option; the `gateskip generate` command decodes with the lean
decoder instead (gateskip.inference.decoding: the same tokens, less per-token overhead).

A threshold budget decides per token and per module from that token's own importance,
so a single-token decode step skips as often as a long prefill does; a skipped
attention branch still writes the token's K/V (design.md section 1), so the cache
has no holes and cached decoding equals recomputing the sequence without a cache.
"""

from __future__ import annotations

import argparse

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, TextStreamer

from ..core.budget import ThresholdBudget
from ..core.flops import FlopReport
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from ..validate import existing_path, fits_context, integer, ratio, real, utf8_text
from ..validate import seed as seed_type
from .contract import Generation, check_attention_mask, check_prompt, decode_budget, refuse_unmasked_padding, reports


class _SplitStatsAfterPrefill(LogitsProcessor):
    """Called once per forward, after the logits: from the second forward on, the plan
    records into `decode` instead, so prefill and decoding are reported apart."""

    def __init__(self, plan: SkipPlan, decode: SkipStats):
        self.plan, self.decode = plan, decode

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.plan.stats = self.decode
        return scores


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
                            "must be left-padded (tokenizer.padding_side = 'left'); gateskip.inference.decoding.decode takes "
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


# HF generate options that change greedy or sampled tokens and that gateskip.inference.decoding does not
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
                            "apply; use gateskip.inference.generation.generate (HF generate) from Python")


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


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The prompt's ids, framed as a user turn by the chat template when `chat`."""
    if chat:
        if not has_chat_template(tokenizer):
            raise GateSkipError("this tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def print_reports(parts: dict[str, FlopReport]) -> None:
    for name, r in parts.items():
        label = "per generated token" if name == "decoding" else "whole generation"
        print(f"{label} ({r.tokens} tokens): {r.summary()}")


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..core.model import load_gates
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
