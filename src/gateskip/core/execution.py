"""Physical execution of gated branches: skipped tokens are removed before the work.

Attention follows design.md section 1: keys and values are computed (and cached) for
every token, so later tokens and the KV cache never see a hole; queries, scores and
the output projection run for kept tokens only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GateSkipError
from .tokens import gather_packed, pack_per_sequence


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding for x (B, H, T, D) with cos/sin (B, T, D), as the HF Llama family does it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (_rotate_half(x) * sin)


def _heads(proj: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = proj.shape
    return proj.view(b, t, -1, head_dim).transpose(1, 2)


def _query_mask(mask: torch.Tensor | None, index: torch.Tensor, slot_valid: torch.Tensor, length: int, keys: int) -> torch.Tensor:
    """The rows of the layer's attention mask that belong to kept queries, (B, 1, K, S) bool.

    With no mask (no padding, plain causal) the query at position t of this call sits
    at key position keys - length + t. Padding slots may see every key: their outputs
    are dropped, and a fully masked row would give NaN.
    """
    b = index.shape[0]
    if mask is None:
        key_pos = torch.arange(keys, device=index.device)
        allowed = key_pos[None, None, :] <= (keys - length + index)[..., None]
    elif isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            mask = mask == 0  # additive float mask: 0 where attending
        allowed = gather_packed(mask[:, 0].expand(b, -1, -1), index)
    else:
        raise GateSkipError("physical execution needs attn_implementation 'sdpa' or 'eager'")
    return (allowed | ~slot_valid[..., None]).unsqueeze(1)


_compiled_flex = None


def _flex(q, k, v, mask: torch.Tensor | None, index: torch.Tensor, slot_valid: torch.Tensor, length: int,
          scale: float) -> torch.Tensor:
    """Kept queries through FlexAttention: the block mask comes from the kept positions (plain
    causal: key <= the query's position) or, with a mask from the model (padding, windows),
    from its gathered rows. Fully masked blocks are skipped and SDPA's fused kernels are not
    lost to an explicit mask; compiled on a GPU (eager, unfused, elsewhere: tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _compiled_flex
    b, kq, keys = q.shape[0], q.shape[2], k.shape[2]
    if mask is None:
        pos = keys - length + index.masked_fill(~slot_valid, keys)  # padding slots see every key

        def mask_mod(bi, h, qi, kv):
            return kv <= pos[bi, qi]
    else:
        allowed = _query_mask(mask, index, slot_valid, length, keys)[:, 0]

        def mask_mod(bi, h, qi, kv):
            return allowed[bi, qi, kv]
    block = create_block_mask(mask_mod, b, None, kq, keys, device=q.device)
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        return _compiled_flex(q, k, v, block_mask=block, scale=scale, enable_gqa=True)
    return flex_attention(q, k, v, block_mask=block, scale=scale, enable_gqa=True)


def attention_physical(
    attn: nn.Module,
    x: torch.Tensor,
    keep: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache,
    cache_kwargs: dict,
    capacity: int | None = None,
    kernel: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Attention output of kept tokens in the packed layout (B, K, d) with its index and slot
    mask (see tokens.pack_per_sequence), or None if no token is kept.

    x is the branch input (B, T, d). K/V of all tokens go into the cache either way. kernel:
    SkipPlan.attention.
    """
    b, t, _ = x.shape
    hd = attn.head_dim
    cos, sin = (p.expand(b, -1, -1) for p in position_embeddings)

    k = _heads(attn.k_proj(x), hd)
    v = _heads(attn.v_proj(x), hd)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = _rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=cache_kwargs)

    index, slot_valid = pack_per_sequence(keep, capacity)
    if index.shape[1] == 0:
        return None
    q = _heads(attn.q_proj(gather_packed(x, index)), hd)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = _rope(q, gather_packed(cos, index), gather_packed(sin, index))

    if kernel == "flex" or (kernel == "auto" and q.is_cuda):
        out = _flex(q, k, v, attention_mask, index, slot_valid, t, attn.scaling)
    else:
        mask = _query_mask(attention_mask, index, slot_valid, t, k.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b, index.shape[1], -1)
    return attn.o_proj(out), index, slot_valid


def branch_physical(branch: nn.Module, x: torch.Tensor, keep: torch.Tensor, capacity: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A token-wise branch (MLP) on kept tokens only, in the packed layout (B, K, d)."""
    index, slot_valid = pack_per_sequence(keep, capacity)
    if index.shape[1] == 0:
        return None
    return branch(gather_packed(x, index)), index, slot_valid


# Decode steps: one token per row. A batch's rows skip different modules, so a module runs
# on the rows that keep it (gathered), as prefill runs it on the kept tokens.


# A decode step reads every weight once however many rows it runs, so on a memory-bound device
# gathering pays only when few rows are left: above this share the module runs on every row and
# the skipped rows' outputs are dropped (the decision, and its accounting, are the same).
GATHER_AT_MOST = 0.5


def kept_rows(keep: torch.Tensor | None) -> torch.Tensor | None:
    """Rows (N,) of a one-token step that run a module; None: run every row (no gather)."""
    if keep is None:
        return None
    rows = keep[:, 0].nonzero().squeeze(1)  # waits for the device: the row count sizes the work
    return None if rows.numel() > GATHER_AT_MOST * keep.shape[0] else rows


def _scatter_rows(y: torch.Tensor, rows: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(N, 1, d) outputs of the kept rows -> (B, 1, d), zero in the rows that skipped."""
    return y if rows is None else y.new_zeros(batch, 1, y.shape[-1]).index_copy_(0, rows, y)


def step_keys(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K (rotated) and V of a decode step's tokens, (B, kv heads, 1, head dim) each."""
    k = _heads(attn.k_proj(x), attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    return _rope(k, cos, sin), _heads(attn.v_proj(x), attn.head_dim)


def step_attend(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row attending to its row of k/v (mask: bool, or None: every key), through o_proj: (N, 1, d)."""
    q = _heads(attn.q_proj(x), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    out = F.scaled_dot_product_attention(_rope(q, cos, sin), k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=True)
    return attn.o_proj(out.transpose(1, 2).reshape(x.shape[0], 1, -1))


def step_mlp(branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return branch(x)


@dataclass(frozen=True)
class StepKernels:
    """The dense compute of a decode step's modules; gateskip.inference.compiled swaps in compiled ones,
    while the decisions around them stay in Python."""

    keys: Callable = step_keys
    attend: Callable = step_attend
    mlp: Callable = step_mlp


EAGER = StepKernels()


def attention_step(attn: nn.Module, x: torch.Tensor, rows: torch.Tensor | None,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                   cache, cache_kwargs: dict, kernels: StepKernels | None = None) -> torch.Tensor | None:
    """Attention of a decode step, (B, 1, d), for the kept `rows` (None: all; none: only K/V).

    Every row's K/V go into the cache (design.md section 1); each kept query attends to its own
    row of the cache. With no mask (batch 1, no padding) one query sees every key the cache
    hands it (a sliding layer gets only its window), so no mask is built.
    """
    kernels = kernels or EAGER
    b = x.shape[0]
    cos, sin = (p.expand(b, -1, -1) for p in position_embeddings)
    k, v = cache.update(*kernels.keys(attn, x, cos, sin), attn.layer_idx, kwargs=cache_kwargs)
    if rows is not None:
        if rows.numel() == 0:
            return None
        x, cos, sin, k, v = (a.index_select(0, rows) for a in (x, cos, sin, k, v))
        attention_mask = None if attention_mask is None else attention_mask.index_select(0, rows)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # additive float mask: 0 where attending
    return _scatter_rows(kernels.attend(attn, x, cos, sin, k, v, attention_mask), rows, b)


def branch_step(branch: nn.Module, x: torch.Tensor, rows: torch.Tensor | None,
                kernels: StepKernels | None = None) -> torch.Tensor | None:
    """A token-wise branch (MLP) of a decode step, (B, 1, d), on the kept `rows` only."""
    run = (kernels or EAGER).mlp
    if rows is None:
        return run(branch, x)
    if rows.numel() == 0:
        return None
    return _scatter_rows(run(branch, x.index_select(0, rows)), rows, x.shape[0])
