"""The gated decoder layer: one forward for the Llama family (Llama, Qwen2, Mistral)
and Gemma3, read top to bottom.

    h <- h + keep_attn * g_attn(x) * attn(x),   x = norm_in(h)
    h <- h + keep_mlp  * g_mlp(x)  * mlp(x),    x = norm_in'(h)

Gemma3 also normalises each branch output (post-norms) before it is gated. With no
ForwardContext the original HF forward runs untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .execution import attention_physical, branch_physical
from .plan import ForwardContext
from .tokens import gather_packed, scatter_add_packed


def branch_norms(layer: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """(input norm, output norm or None) of each branch; Gemma-style layers have both."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return {
            "attn": (layer.input_layernorm, layer.post_attention_layernorm),
            "mlp": (layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm),
        }
    return {"attn": (layer.input_layernorm, None), "mlp": (layer.post_attention_layernorm, None)}


def _add_masked(h: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None, keep: torch.Tensor | None,
                out_norm: nn.Module | None) -> torch.Tensor:
    """Masked execution: every token was computed; skipped ones contribute nothing."""
    if out_norm is not None:
        out = out_norm(out)
    if gate is not None:
        out = out * gate
    if keep is not None:
        out = out * keep.unsqueeze(-1).to(out.dtype)
    return h + out


def _add_packed(h: torch.Tensor, result, gate: torch.Tensor | None, out_norm: nn.Module | None) -> torch.Tensor:
    """Physical execution: add the kept tokens' outputs (packed layout) back into the residual stream."""
    if result is None:  # every token skipped this branch
        return h
    out, index, slot_valid = result
    if out_norm is not None:
        out = out_norm(out)
    if gate is not None:
        out = out * gather_packed(gate, index)
    return scatter_add_packed(h, index, slot_valid, out)


def _gate_and_keep(ctx: ForwardContext, branch: str, layer: int, x: torch.Tensor):
    """Gate values of a branch input (None if ungated) and the keep mask the budget derives from them."""
    gate = ctx.gate(branch, layer)
    g = gate(x) if gate is not None else None
    return g, ctx.decide(f"{branch}.{layer}", g)


def _skips_physically(ctx: ForwardContext, keep: torch.Tensor | None) -> bool:
    if not ctx.physical or keep is None:
        return False
    return ctx.skips if ctx.skips is not None else not bool(keep.all())  # the latter waits for the device


def _mask_to_apply(ctx: ForwardContext, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Physical execution reaches the dense path only when every token is kept: no mask to multiply."""
    return None if ctx.physical else keep


class GatedLayerMixin:
    """Mixed in before an HF decoder layer class; see gateskip.model.add_gates."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, skip_ctx: ForwardContext | None = None, **kwargs):
        if "past_key_values" in kwargs:  # older spelling of `cache`
            cache = kwargs.pop("past_key_values")
        if skip_ctx is None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        layer = self.self_attn.layer_idx
        norms = branch_norms(self)
        h = hidden_states

        # Attention branch
        norm_in, norm_out = norms["attn"]
        x = norm_in(h)
        g, keep = _gate_and_keep(skip_ctx, "attn", layer, x)
        if _skips_physically(skip_ctx, keep):
            result = attention_physical(self.self_attn, x, keep, position_embeddings, attention_mask, cache, kwargs,
                                        skip_ctx.capacity)
            h = _add_packed(h, result, g, norm_out)
        else:
            out, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                    cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
            h = _add_masked(h, out, g, _mask_to_apply(skip_ctx, keep), norm_out)

        # MLP branch
        norm_in, norm_out = norms["mlp"]
        x = norm_in(h)
        g, keep = _gate_and_keep(skip_ctx, "mlp", layer, x)
        if _skips_physically(skip_ctx, keep):
            h = _add_packed(h, branch_physical(self.mlp, x, keep, skip_ctx.capacity), g, norm_out)
        else:
            h = _add_masked(h, self.mlp(x), g, _mask_to_apply(skip_ctx, keep), norm_out)
        return h
