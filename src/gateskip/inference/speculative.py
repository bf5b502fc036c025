"""Lossless self-speculative decoding: the gated model drafts with skipping, then checks
its own draft at full compute.

One step: draft k tokens one by one at a threshold budget (cheap), then run the last
accepted token and the k drafts through the model once without skipping (the "full
model" is the gated model at budget 0), accept the longest prefix the full model agrees
with, and take the full model's next token after it. Greedy output is therefore exactly
full-compute greedy output; sampling uses the standard rejection rule (Leviathan et
al. 2023), so samples follow the full model's distribution.

Draft and verify share one preallocated KV cache (gateskip.inference.decoding.StaticKV). Draft steps
write K/V computed from skipped hidden states, so before verifying, the cache is rolled
back to the last position the full model wrote (one assignment of its length); the verify
pass rewrites those positions at full compute, and after acceptance the cache is rolled
back to the accepted tokens. The cache therefore only ever holds full-compute K/V when a
draft starts. A sliding-window layer is handed its window from the same buffer, so rolling
back needs nothing of HF's sliding-window cache layers.

Adaptive drafting (`adaptive=True`) picks each round's draft length from what it has
measured: the acceptance rate and the wall time of a draft step and of a verify pass. A
draft of k tokens is expected to yield (1 - a^(k+1)) / (1 - a) tokens at a cost of k draft
steps and one verify pass; the length with the most tokens per second wins, and k = 0
(plain full-compute decoding) wins when no draft pays, with a probe of k = 1 now and then
to keep the estimate fresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..core.budget import AllocationBudget, ThresholdBudget
from ..core.flops import ModelDims, flop_report
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from .contract import check_prompt, combine, decode_budget, stop_tokens
from .decoding import Chooser, Stepper, prefill, step_context


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


class DraftLength:
    """The draft length that maximises expected tokens per second, from measured acceptance and costs.

    a: acceptance rate of drafted tokens (counts with a weak prior, older rounds fading);
    draft and verify: mean seconds of one draft step and of one verify pass.
    """

    PROBE_EVERY = 8  # rounds at k = 0 before a k = 1 probe

    def __init__(self, k: int, max_k: int, decay: float = 0.9):
        self.k, self.max_k, self.decay = k, max_k, decay
        self.drafted, self.accepted = 2.0, 1.0  # prior: half accepted, worth two drafts
        self.draft = self.verify = None
        self.idle = 0

    def update(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float) -> None:
        if drafted:
            self.drafted = self.decay * self.drafted + drafted
            self.accepted = self.decay * self.accepted + accepted
            step = draft_seconds / drafted
            self.draft = step if self.draft is None else 0.8 * self.draft + 0.2 * step
        self.verify = verify_seconds if self.verify is None else 0.8 * self.verify + 0.2 * verify_seconds

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second of a round drafting k tokens."""
        a = min(self.accepted / self.drafted, 0.999)
        return (1 - a ** (k + 1)) / (1 - a) / (k * (self.draft or 0.0) + self.verify)

    def next(self) -> int:
        if self.verify is None or self.draft is None:
            return self.k  # nothing measured yet: the caller's k
        best = max(range(self.max_k + 1), key=self.expected_rate)
        self.idle = self.idle + 1 if best == 0 else 0
        if best == 0 and self.idle % self.PROBE_EVERY == 0:
            return 1
        return best


def _accept(chooser: Chooser, drafts: list[int], draft_probs: list, logits: torch.Tensor) -> list[int]:
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


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    budget: float | ThresholdBudget | AllocationBudget,
    k: int = 4,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    adaptive: bool = False,
    max_k: int = 8,
    streamer=None,
    generator: torch.Generator | None = None,
) -> SpeculativeResult:
    """Generate up to max_new_tokens for one prompt (1, T), drafting k tokens at a time at
    `budget` (a calibrated ratio, a net-saving target of stored allocations, or a budget).

    adaptive: choose each round's draft length (0 to max_k) from measured acceptance and
    costs (DraftLength), starting at k. generator: for sampling, on the model's device.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise GateSkipError(f"self-speculative decoding takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    check_prompt(model, input_ids)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise GateSkipError(f"draft length k must be an integer >= 1, got {k!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    chooser = Chooser(do_sample, temperature, top_k, top_p, generator)
    draft_budget = decode_budget(model, budget)
    stops = stop_tokens(eos_token_id)
    n = input_ids.shape[1]
    context = getattr(model.config, "max_position_embeddings", None) or n + max_new_tokens
    limit = min(max_new_tokens, context - n)
    lengths = DraftLength(k, max(max_k, k)) if adaptive else None

    result = SpeculativeResult(input_ids, n)
    draft = SkipPlan(budget=draft_budget, stats=result.draft_stats)
    full = SkipPlan(budget=None, stats=result.verify_stats)
    device = _device(model)
    logits, cache = prefill(model, input_ids.to(device), None, full, n + limit + 1)
    step = Stepper(model, cache)

    def forward(plan: SkipPlan, tokens: list[int], keep: int = 1) -> torch.Tensor:
        t, pos = len(tokens), cache.length
        positions = torch.arange(pos, pos + t, device=device)[None]
        ctx = step_context(plan, model, 1, t, torch.tensor([pos], device=device))
        return step(torch.tensor([tokens], device=device), positions, ctx, logits_to_keep=keep)[0]

    if streamer is not None:
        streamer.put(input_ids.cpu())
    token, _ = chooser.pick(logits)
    new = [int(token[0])]
    result.passes = 1
    if streamer is not None:
        streamer.put(torch.tensor(new))
    while len(new) < limit and new[-1] not in stops:
        written = cache.length  # every token but the last, all at full compute
        steps = min(k, limit - len(new))
        drafts, draft_probs, last = [], [], new[-1]
        start = time.perf_counter()
        for _ in range(steps):
            token, probs = chooser.pick(forward(draft, [last]))
            last = int(token[0])
            drafts.append(last)
            draft_probs.append(None if probs is None else probs[0])
        cache.length = written  # drop K/V computed from skipped hidden states
        drafted_at = time.perf_counter()
        kept = _accept(chooser, drafts, draft_probs, forward(full, [new[-1]] + drafts, keep=steps + 1))
        verified_at = time.perf_counter()
        cache.length = written + len(kept)  # K/V of the rejected drafts go; the new last token is not in yet
        accepted = len(kept) - 1
        result.drafted += steps
        result.accepted += accepted
        result.passes += 1
        for i, t in enumerate(kept):  # stop at the first stop token
            if t in stops:
                kept = kept[: i + 1]
                break
        kept = kept[: limit - len(new)]
        new += kept
        if streamer is not None:
            streamer.put(torch.tensor(kept))
        if lengths is not None:
            lengths.update(steps, accepted, drafted_at - start, verified_at - drafted_at)
            k = lengths.next()
    if streamer is not None:
        streamer.end()
    result.context_full = len(new) == limit < max_new_tokens and new[-1] not in stops
    result.sequences = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], 1)
    return result
