"""Lossless self-speculative decoding: the gated model drafts with skipping, then checks
its own draft at full compute.

One step: draft k tokens one by one at a threshold budget (cheap), then run the last
accepted token and the k drafts through the model once without skipping (the "full
model" is the gated model at budget 0), accept the longest prefix the full model agrees
with, and take the full model's next token after it. Greedy output is therefore exactly
full-compute greedy output; sampling uses the standard rejection rule (Leviathan et
al. 2023), so samples follow the full model's distribution.

Draft and verify share one KV cache. Draft steps write K/V computed from skipped
hidden states, so before verifying, the cache is cropped back to the last position the
full model wrote; the verify pass rewrites those positions at full compute, and after
acceptance the cache is cropped to the accepted tokens. The cache therefore only ever
holds full-compute K/V when a draft starts. Sliding-window layers keep only the last
window of K/V, so after the prefill the cache records past states (HF's
`activate_past_recording`, as HF's assisted decoding does): a layer then keeps what a
draft step pushed out of its window until the next crop, and a crop can roll back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .budget import ThresholdBudget
from .errors import GateSkipError
from .flops import ModelDims, flop_report
from .generation import check_prompt, combine, decode_budget
from .plan import SkipPlan
from .stats import SkipStats


@dataclass
class SpeculativeResult:
    sequences: torch.Tensor  # (1, prompt + new)
    prompt_length: int
    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # full-compute verification passes, prefill included
    context_full: bool = False  # stopped because the model's context ended before max_new_tokens
    draft_stats: SkipStats = field(default_factory=SkipStats)
    verify_stats: SkipStats = field(default_factory=SkipStats)

    @property
    def new_tokens(self) -> int:
        return self.sequences.shape[1] - self.prompt_length

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per full-compute pass (plain decoding makes 1)."""
        return self.new_tokens / self.passes if self.passes else 0.0

    def flops(self, model):
        """FLOP report over every forward, draft and verify: its net saving is negative
        whenever rejected drafts cost more than the skipping saves."""
        dims, config = ModelDims.from_config(model.config), model.gate_bank.config
        return combine(flop_report(self.draft_stats, dims, config), flop_report(self.verify_stats, dims, config))

    def summary(self) -> str:
        ended = f"; stopped at the model's context ({self.sequences.shape[1]} tokens)" if self.context_full else ""
        return (
            f"self-speculative: {self.new_tokens} tokens in {self.passes} full passes "
            f"({self.tokens_per_pass:.2f} tokens/pass), {self.accepted}/{self.drafted} drafts accepted "
            f"({100 * self.acceptance_rate:.0f}%){ended}"
        )


def _warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


class _Chooser:
    """Turns logits into tokens: argmax when greedy, else a sample from the warped
    distribution (which is also what the rejection rule compares)."""

    def __init__(self, do_sample: bool, warpers: LogitsProcessorList, generator: torch.Generator | None):
        self.do_sample, self.warpers, self.generator = do_sample, warpers, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N, V) probabilities after temperature / top-k / top-p."""
        return torch.softmax(self.warpers(None, logits.float()), dim=-1)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token (N,), its distribution (N, V) or None when greedy)."""
        if not self.do_sample:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return self.sample(probs), probs

    def uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))


def _accept(chooser: _Chooser, drafts: list[int], draft_probs: list, logits: torch.Tensor) -> list[int]:
    """Tokens to keep after one verify pass: the accepted drafts plus one full-model token.

    logits (k+1, V) are the full model's predictions after the last accepted token and
    after each draft token.
    """
    if not chooser.do_sample:
        target = logits.argmax(-1).tolist()
        n = 0
        while n < len(drafts) and drafts[n] == target[n]:
            n += 1
        return drafts[:n] + [target[n]]
    p = chooser.probs(logits)
    for i, (token, q) in enumerate(zip(drafts, draft_probs)):
        if chooser.uniform() * float(q[token]) >= float(p[i, token]):  # reject with prob 1 - p/q
            residual = (p[i] - q).clamp(min=0)
            return drafts[:i] + [int(chooser.sample(residual / residual.sum()))]
    return drafts + [int(chooser.sample(p[-1]))]


def _forward(model, tokens: list[int] | torch.Tensor, cache: DynamicCache, plan: SkipPlan, keep: int = 1) -> torch.Tensor:
    ids = tokens if isinstance(tokens, torch.Tensor) else torch.tensor([tokens], device=_device(model))
    return model(ids, cache=cache, use_cache=True, skip_plan=plan, logits_to_keep=keep).logits[0]


def _truncate(cache: DynamicCache, length: int) -> None:
    """Keep the first `length` positions of every layer (crop takes minus the number to remove;
    crop(0) still trims a recording sliding-window layer back to its window)."""
    cache.crop(length - cache.get_seq_length())


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    budget: float | ThresholdBudget,
    k: int = 4,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    adaptive: bool = False,
    max_k: int = 16,
    streamer=None,
    generator: torch.Generator | None = None,
) -> SpeculativeResult:
    """Generate up to max_new_tokens for one prompt (1, T), drafting k tokens at a time at
    `budget` (a calibrated ratio or a ThresholdBudget).

    adaptive: grow k by one after a fully accepted draft, shrink it by one after a
    rejection (between 1 and max_k). generator: for sampling, on the model's device.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise GateSkipError(f"self-speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    check_prompt(model, input_ids)
    if not isinstance(k, int) or k < 1:
        raise GateSkipError(f"draft length k must be an integer >= 1, got {k!r}")
    if max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise GateSkipError(f"temperature must be positive when sampling, got {temperature}")
    draft_budget = decode_budget(model, budget)
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    context = getattr(model.config, "max_position_embeddings", None) or input_ids.shape[1] + max_new_tokens
    limit = min(max_new_tokens, context - input_ids.shape[1])
    chooser = _Chooser(do_sample, _warpers(temperature, top_k, top_p), generator)

    result = SpeculativeResult(input_ids, input_ids.shape[1])
    draft = SkipPlan(budget=draft_budget, stats=result.draft_stats)
    full = SkipPlan(budget=None, stats=result.verify_stats)
    cache = DynamicCache(config=model.config)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    token, _ = chooser.pick(_forward(model, input_ids.to(_device(model)), cache, full))
    cache.activate_past_recording()  # after the prefill: a long prompt is not kept beyond the window
    new = [int(token[0])]
    result.passes = 1
    if streamer is not None:
        streamer.put(torch.tensor(new))
    while len(new) < limit and new[-1] not in stops:
        written = cache.get_seq_length()  # every token but the last, all at full compute
        steps = min(k, limit - len(new))
        drafts, draft_probs, last = [], [], new[-1]
        for _ in range(steps):
            token, probs = chooser.pick(_forward(model, [last], cache, draft))
            last = int(token[0])
            drafts.append(last)
            draft_probs.append(None if probs is None else probs[0])
        _truncate(cache, written)  # drop K/V computed from skipped hidden states
        logits = _forward(model, [new[-1]] + drafts, cache, full, keep=steps + 1)
        kept = _accept(chooser, drafts, draft_probs, logits)
        _truncate(cache, written + len(kept))  # K/V of the rejected drafts go; the new last token is not in yet
        all_accepted = len(kept) == steps + 1
        result.drafted += steps
        result.accepted += len(kept) - 1
        result.passes += 1
        for i, t in enumerate(kept):  # stop at the first stop token
            if t in stops:
                kept = kept[: i + 1]
                break
        kept = kept[: limit - len(new)]
        new += kept
        if streamer is not None:
            streamer.put(torch.tensor(kept))
        if adaptive:
            k = min(k + 1, max_k) if all_accepted else max(k - 1, 1)
    if streamer is not None:
        streamer.end()
    result.context_full = len(new) == limit < max_new_tokens and new[-1] not in stops
    result.sequences = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], 1)
    return result
