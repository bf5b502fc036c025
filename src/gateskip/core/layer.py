"""The gated decoder layer: one forward for the Llama family (Llama, Qwen2, Mistral)
and Gemma3, read top to bottom.

    h <- h + keep_attn * g_attn(x) * attn(x),   x = norm_in(h)
    h <- h + keep_mlp  * g_mlp(x)  * mlp(x),    x = norm_in'(h)

(unit gates add kept outputs unscaled). What each module does - which tokens run it, what
scales them, whether it runs at all - is the ForwardContext's Decision; the layer only
executes it.

Gemma3 also normalises each branch output (post-norms) before it is gated. With no
ForwardContext the original HF forward runs untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .execution import attention_physical, attention_step, branch_physical, branch_step, kept_rows
from .plan import Decision, ForwardContext
from .tokens import gather_packed, scatter_add_packed


def branch_norms(layer: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """(input norm, output norm or None) of each branch; Gemma-style layers have both."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return {
            "attn": (layer.input_layernorm, layer.post_attention_layernorm),
            "mlp": (layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm),
        }
    return {"attn": (layer.input_layernorm, None), "mlp": (layer.post_attention_layernorm, None)}


def _add_dense(h: torch.Tensor, out: torch.Tensor, d: Decision, out_norm: nn.Module | None) -> torch.Tensor:
    """Outputs of every token (masked execution) or row (decode step, zero where skipped); skipped ones add nothing."""
    if out_norm is not None:
        out = out_norm(out)
    if d.scale is not None:
        out = out * d.scale
    if d.keep is not None:
        out = out * d.keep.unsqueeze(-1).to(out.dtype)
    return h + out


def _add_packed(h: torch.Tensor, result, d: Decision, out_norm: nn.Module | None) -> torch.Tensor:
    """Physical execution: add the kept tokens' outputs (packed layout) back into the residual stream."""
    if result is None:  # every token skipped this branch
        return h
    out, index, slot_valid = result
    if out_norm is not None:
        out = out_norm(out)
    if d.scale is not None:
        out = out * gather_packed(d.scale, index)
    return scatter_add_packed(h, index, slot_valid, out)


class GatedLayerMixin:
    """Mixed in before an HF decoder layer class; see gateskip.core.model.add_gates."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, skip_ctx: ForwardContext | None = None, **kwargs):
        cache = past_key_values
        if skip_ctx is None:
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                   **kwargs)
        layer = self.self_attn.layer_idx
        norms = branch_norms(self)
        h = hidden_states
        step = skip_ctx.decode_step and skip_ctx.physical  # one token per row: run modules on their kept rows
        needs_keys = cache is not None and not skip_ctx.decode_step  # see ForwardContext.decode_step

        # Attention branch (a removed one still computes keys and values where a cache wants them)
        norm_in, norm_out = norms["attn"]
        x = None if skip_ctx.removes("attn", layer) and not needs_keys else norm_in(h)
        d = skip_ctx.decide("attn", layer, x, needs_keys)
        if d.removed and not needs_keys:
            pass
        elif step:
            out = attention_step(self.self_attn, x, kept_rows(d.keep), position_embeddings, attention_mask, cache, kwargs,
                                 skip_ctx.kernels)
            h = h if out is None else _add_dense(h, out, d, norm_out)
        elif d.packed or d.removed:
            result = attention_physical(self.self_attn, x, d.keep, position_embeddings, attention_mask, cache, kwargs,
                                        d.capacity, skip_ctx.plan.attention)
            h = _add_packed(h, result, d, norm_out)
        else:
            out, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
            h = _add_dense(h, out, d, norm_out)

        # MLP branch
        norm_in, norm_out = norms["mlp"]
        x = None if skip_ctx.removes("mlp", layer) else norm_in(h)
        d = skip_ctx.decide("mlp", layer, x)
        if d.removed:
            pass
        elif step:
            out = branch_step(self.mlp, x, kept_rows(d.keep), skip_ctx.kernels)
            h = h if out is None else _add_dense(h, out, d, norm_out)
        elif d.packed:
            h = _add_packed(h, branch_physical(self.mlp, x, d.keep, d.capacity), d, norm_out)
        else:
            h = _add_dense(h, self.mlp(x), d, norm_out)
        return h
