"""Lean cached decoding: the gated layers driven directly, with a preallocated KV cache.

HF `generate` (gateskip.inference.generation) spends a good share of each step on machinery a
skipping decoder does not need: building attention masks, growing the cache by
concatenation, logits processors. Here the prefill runs through the HF forward once
(so it is exactly what `generate` computes), its K/V are copied into a `StaticKV`, and
each decode step runs embeddings, the gated decoder layers, the final norm and the LM
head itself:

- one query attends to the cache without a mask (batch 1; a left-padded batch gets one
  key-padding row per step), sliding-window layers see a slice of the last window;
- the cache is preallocated and its length is one integer, so rolling it back (what
  self-speculative decoding does after a rejected draft) is an assignment;
- skip decisions and accounting stay on the device (gateskip.core.stats folds its counts
  when a report is read), the layer code is the one every other execution uses.

Greedy tokens equal those of HF `generate` under the same budget (tests/test_decoding.py).
`decode(compile=True)` runs each module's dense compute through gateskip.inference.compiled instead.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ..core.budget import AllocationBudget, ThresholdBudget
from ..core.execution import StepKernels
from ..core.model import decoder_layers
from ..core.plan import ForwardContext, SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from .compiled import KERNELS
from .contract import (Generation, check_attention_mask, check_prompt, decode_budget, refuse_unmasked_padding,
                         stop_tokens)


def layer_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window (None: full attention)."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types and config.model_type != "mistral":  # Mistral slides every layer whatever layer_types says
        return [window if t == "sliding_attention" else None for t in types]
    return [window] * n


class StaticKV:
    """K/V of every layer in preallocated buffers (B, kv heads, capacity, head dim).

    `length` positions are written; `update` (called by the attention of each layer) writes
    the new ones after them and returns what the new queries may see: everything, or the
    last window of a sliding layer (plus the new tokens). `advance` moves `length` once per
    forward, and setting `length` lower rolls the cache back. whole: `update` returns the whole
    buffers instead, one shape however full they are (a compiled step; the caller masks the
    positions that are not written or outside a window).
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int, whole: bool = False):
        cfg, param = model.config, next(model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, capacity, head_dim)
        self.windows = layer_windows(cfg)
        self.keys = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in self.windows]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.capacity, self.length, self.whole = capacity, 0, whole

    def start(self, layer: int) -> int:
        """First position the next query of this layer attends to."""
        w = self.windows[layer]
        return 0 if w is None else max(0, self.length - w + 1)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, kwargs=None) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.length, self.length + k.shape[2]
        if e > self.capacity:
            raise GateSkipError(f"the KV cache holds {self.capacity} positions; this forward needs {e}")
        self.keys[layer_idx][:, :, s:e] = k
        self.values[layer_idx][:, :, s:e] = v
        if self.whole:
            return self.keys[layer_idx], self.values[layer_idx]
        start = self.start(layer_idx)
        return self.keys[layer_idx][:, :, start:e], self.values[layer_idx][:, :, start:e]

    def advance(self, t: int) -> None:
        self.length += t

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def load(self, cache: DynamicCache, length: int) -> None:
        """Take over what an HF cache holds after a prefill of `length` positions (a sliding
        layer holds only its last positions: the ones before are never read again)."""
        for i, layer in enumerate(cache.layers):
            n = layer.keys.shape[2]
            self.keys[i][:, :, length - n : length] = layer.keys
            self.values[i][:, :, length - n : length] = layer.values
        self.length = length


class Stepper:
    """One forward of the gated model over new tokens that attend to a StaticKV."""

    def __init__(self, model: nn.Module, cache: StaticKV):
        self.model, self.cache = model, cache
        inner = model.model
        self.layers = list(decoder_layers(model))
        self.kinds = [w is not None for w in cache.windows]  # True: sliding
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.rope_kind = types if "layer_type" in inspect.signature(inner.rotary_emb.forward).parameters else None
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def masks(self, t: int, key_valid: torch.Tensor | None) -> dict[bool, torch.Tensor | None]:
        """Attention mask per kind of layer, (B, 1, t, keys) bool, or None where one query sees
        every key it is given (batch 1, no padding)."""
        if self.cache.whole:
            return self.whole_masks(t, key_valid)
        cache, out = self.cache, {}
        e = cache.length + t
        for sliding in set(self.kinds):
            layer = self.kinds.index(sliding)
            start = cache.start(layer)
            if t == 1 and key_valid is None:
                out[sliding] = None
                continue
            q = torch.arange(cache.length, e, device=cache.keys[0].device)[:, None]
            k = torch.arange(start, e, device=q.device)[None, :]
            allowed = k <= q
            if sliding:
                allowed &= k > q - cache.windows[layer]
            allowed = allowed[None, None]
            if key_valid is not None:
                allowed = allowed & key_valid[:, None, None, start:e]
            out[sliding] = allowed
        return out

    def whole_masks(self, t: int, key_valid: torch.Tensor | None) -> dict[bool, torch.Tensor]:
        """Masks over the whole cache for one query per row, (B, 1, 1, capacity) bool: the keys
        written so far (within the window of a sliding layer) that are not padding."""
        if t != 1:
            raise GateSkipError("a cache handing out whole buffers serves one-token decode steps only")
        cache, out = self.cache, {}
        k = torch.arange(cache.capacity, device=cache.keys[0].device)
        b = cache.keys[0].shape[0]
        for sliding in set(self.kinds):
            allowed = k <= cache.length
            if sliding:
                allowed &= k > cache.length - cache.windows[self.kinds.index(sliding)]
            allowed = allowed.expand(b, -1) if key_valid is None else allowed & key_valid[:, : cache.capacity]
            out[sliding] = allowed[:, None, None]
        return out

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                 key_valid: torch.Tensor | None = None, logits_to_keep: int = 1) -> torch.Tensor:
        inner, t = self.model.model, ids.shape[1]
        h = inner.embed_tokens(ids)
        masks = self.masks(t, key_valid)
        rope = {}
        for i, layer in enumerate(self.layers):
            kind = None if self.rope_kind is None else self.rope_kind[i]
            if kind not in rope:
                rope[kind] = inner.rotary_emb(h, positions) if kind is None else inner.rotary_emb(h, positions, kind)
            h = layer(h, attention_mask=masks[self.kinds[i]], position_ids=positions, past_key_values=self.cache,
                      position_embeddings=rope[kind], skip_ctx=ctx)
        self.cache.advance(t)
        logits = self.model.lm_head(inner.norm(h[:, -logits_to_keep:]))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def step_context(plan: SkipPlan, model, batch: int, t: int, context: torch.Tensor,
                 kernels: StepKernels | None = None) -> ForwardContext:
    """The ForwardContext of a step over t new real tokens; context (B,) counts each row's real
    keys before the step. No token of a decode step is a sequence's first, so none is protected.
    kernels: the dense compute of a one-token step (None: eager)."""
    valid = torch.ones(batch, t, dtype=torch.bool, device=context.device)
    ctx_len = (context[:, None] + torch.arange(1, t + 1, device=context.device)).float()
    if plan.stats is not None:
        plan.stats.record_forward(valid, ctx_len)
    return ForwardContext(plan, model.gate_bank if plan.apply_gates else None, valid, ctx_len, None, decode_step=t == 1,
                          kernels=kernels)


def warpers(temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    out = LogitsProcessorList()
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(temperature)))  # HF takes floats only (an int 2 is refused)
    if top_k:
        out.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopPLogitsWarper(float(top_p)))
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Sampling settings that mean something, each refused by name otherwise: temperature a finite
    number (above 0 when sampling), top_k None or a whole number >= 1 (0: none), top_p None or in (0, 1]."""
    if not isinstance(do_sample, bool):
        raise GateSkipError(f"do_sample must be True or False, got {do_sample!r}")
    if not _is_number(temperature) or not math.isfinite(temperature):
        raise GateSkipError(f"temperature must be a finite number, got {temperature!r}")
    if do_sample and temperature <= 0:
        raise GateSkipError(f"temperature must be positive when sampling, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise GateSkipError(f"top_k must be None or a whole number of at least 1, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):  # NaN fails the comparison
        raise GateSkipError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


class Chooser:
    """Turns logits into tokens: argmax when greedy, else a sample from the warped
    distribution (which is also what the speculative rejection rule compares)."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None):
        check_sampling(do_sample, temperature, top_k, top_p)
        self.do_sample, self.warpers, self.generator = do_sample, warpers(temperature, top_k, top_p), generator

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


def prefill(model, ids: torch.Tensor, mask: torch.Tensor | None, plan: SkipPlan, capacity: int, whole: bool = False,
            ) -> tuple[torch.Tensor, StaticKV]:
    """Last-position logits (B, V) of the prompt through the HF forward, and a StaticKV holding its K/V."""
    hf_cache = DynamicCache(config=model.config)
    positions = None if mask is None else (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=mask, position_ids=positions, past_key_values=hf_cache, use_cache=True, skip_plan=plan,
                   logits_to_keep=1).logits[:, -1]
    cache = StaticKV(model, ids.shape[0], capacity, whole)
    cache.load(hf_cache, ids.shape[1])
    return logits, cache


@torch.no_grad()
def decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    budget: float | ThresholdBudget | AllocationBudget | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    streamer=None,
    compile: bool = False,
) -> Generation:
    """Decode up to max_new_tokens per row at a calibrated budget, as `generation.generate` does but
    without HF generate's loop. Rows that reach a stop token are filled with pad_token_id; decoding
    ends when every row has stopped. Prompts may be padded on either side (or have holes): each row
    decodes as it would alone (left_aligned); a row of padding only, and padding without a mask, are
    refused.

    compile: run each module's dense compute through torch.compile (gateskip.inference.compiled: the
    decisions stay eager, attention sees the whole static cache; eager again, with one
    warning, if compiling fails). Off by default: on a CPU it costs compile time for little."""
    check_prompt(model, input_ids)
    mask = check_attention_mask(input_ids, attention_mask)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GateSkipError(f"max_new_tokens must be a whole number of at least 1, got {max_new_tokens!r}")
    chooser = Chooser(do_sample, temperature, top_k, top_p, generator)
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or not 0 <= pad_token_id < 2**63:
        raise GateSkipError(f"pad_token_id must be a token id (an int), got {pad_token_id!r}")
    if mask is None and input_ids.shape[0] > 1:
        refuse_unmasked_padding(model, input_ids)
    prompt = input_ids
    if mask is not None:  # any padding side, any holes: each row's real tokens, in order, at the right end
        input_ids, mask = left_aligned(input_ids, mask)
    b, n = input_ids.shape
    context = getattr(model.config, "max_position_embeddings", None) or n + max_new_tokens
    steps = min(max_new_tokens, context - n)
    stops = torch.tensor(sorted(stop_tokens(eos_token_id)), dtype=torch.long, device=input_ids.device)
    padded = mask is not None and not bool(mask.all())
    attention_mask = mask.long() if padded else None
    prefill_stats, decode_stats = SkipStats(), SkipStats()
    plan = SkipPlan(budget=decode_budget(model, budget), stats=prefill_stats)
    logits, cache = prefill(model, input_ids, attention_mask if padded else None, plan, n + steps, whole=compile)
    plan.stats = decode_stats
    step = Stepper(model, cache)
    kernels = KERNELS if compile else None
    key_valid = None
    real = torch.full((b,), n, device=input_ids.device)
    if padded:
        key_valid = torch.ones(b, n + steps, dtype=torch.bool, device=input_ids.device)
        key_valid[:, :n] = attention_mask.bool()
        real = attention_mask.long().sum(1)
    if streamer is not None:
        streamer.put(prompt.cpu())
    out, done = [], torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for i in range(steps):
        token, _ = chooser.pick(logits)
        token = token.masked_fill(done, pad_token_id)
        out.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if stops.numel():
            done |= torch.isin(token, stops)
            if bool(done.all()):
                break
        if i == steps - 1:
            break
        ctx = step_context(plan, model, b, 1, real + i, kernels)
        logits = step(token[:, None], (real + i)[:, None], ctx, key_valid)[:, -1]
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([prompt, torch.stack(out, 1).to(prompt.dtype)], 1)
    return Generation(sequences, prompt.shape[1], prefill_stats, decode_stats, None)


def left_aligned(input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens (mask True), in their order, moved to the right end (left padding, which
    the prefill's positions and the decode steps' appended tokens assume), and the columns that are
    padding in every row dropped. A right-padded batch, or one with holes, then decodes as each row
    would alone."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # padding first, then the real tokens in order
    ids, mask = input_ids.gather(1, order), mask.gather(1, order)
    width = int(mask.sum(1).max())
    return ids[:, -width:], mask[:, -width:]
