"""Local objectives for unit gates: rank tokens by what each branch does to them.

Unit gates only rank tokens (the kept outputs enter unscaled), so a gate needs to know,
from its branch input alone, how much the branch would change a token's residual stream.
One dense forward of the frozen base measures it for every module at once,

    influence[t, m] = ||o_t|| / ||h_t||      (o: branch output as added, h: residual before it)

and each gate regresses its importance onto the within-batch percentile of that influence
(only the order matters: budgets take quantiles, thresholds are calibrated). No backward
pass through the model is needed, so a step costs one forward plus the gates' own work.
The first real token of every sequence (the attention sink) is given the top percentile.

The attribution target measures what the loss needs instead of how large the output is:
scaling each branch output by (1 + z) and taking dLM/dz at z = 0 in one forward and backward
of the base gives, for every token and module at once, the first-order change of the LM loss
(on the token and every later one) when that output is removed, `-<dL/dh, o>`:

    attribution[t, m] = -dL/dz[t, m]      (removal raises the loss by about this much)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.gates import GateBank, importance
from ..core.layer import branch_norms
from ..core.model import decoder_layers
from ..data.textdata import IGNORE
from .losses import lm_loss


@torch.no_grad()
def branch_influence(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module key: (branch input x (B, T, d), influence (B, T))} from one forward of the base model."""
    seen: dict[tuple[str, int, str], torch.Tensor] = {}
    handles = []

    def capture(name, take_input=False):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if take_input:
                seen[name + ("h",)] = args[0]
            seen[name + ("x" if take_input else "o",)] = out
        return hook

    bank: GateBank = model.gate_bank
    for branch, i, norm_in, out_module in _gated_branches(model):
        handles.append(norm_in.register_forward_hook(capture((branch, i), take_input=True)))
        handles.append(out_module.register_forward_hook(capture((branch, i))))
    try:
        model(ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    found = {}
    for key in bank.module_keys():
        branch, i = key.split(".")[0], int(key.split(".")[1])
        h, x, o = (seen[(branch, i, part)] for part in ("h", "x", "o"))
        found[key] = (x, o.float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-6))
    return found


def _output_module(layer, branch: str, norm_out):
    """The module whose output is what the branch adds to the residual stream."""
    return norm_out if norm_out is not None else (layer.self_attn if branch == "attn" else layer.mlp)


def _gated_branches(model):
    """(branch, layer index, input norm, output module) of every gated branch, where the hooks go."""
    bank: GateBank = model.gate_bank
    for i, layer in enumerate(decoder_layers(model)):
        for branch, (norm_in, norm_out) in branch_norms(layer).items():
            if bank.get(branch, i) is not None:
                yield branch, i, norm_in, _output_module(layer, branch, norm_out)


def branch_attribution(model, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module key: (branch input x (B, T, d), attribution (B, T))} from one forward and backward
    of the base model (activations only: the backbone stays frozen)."""
    inputs, probes, handles = {}, {}, []

    def capture(key):
        def hook(module, args, output):
            inputs[key] = output.detach()
        return hook

    def probe(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            z = probes[key] = out.new_zeros(out.shape[:-1] + (1,), requires_grad=True)
            out = out * (1 + z)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return hook

    for branch, i, norm_in, out_module in _gated_branches(model):
        handles.append(norm_in.register_forward_hook(capture(f"{branch}.{i}")))
        handles.append(out_module.register_forward_hook(probe(f"{branch}.{i}")))
    try:
        with torch.enable_grad():
            logits = model(ids, attention_mask=mask, use_cache=False).logits
            loss = lm_loss(logits, ids.masked_fill(~mask.bool(), IGNORE))
            keys = list(probes)
            grads = torch.autograd.grad(loss, [probes[k] for k in keys])
    finally:
        for h in handles:
            h.remove()
    return {k: (inputs[k], -g.squeeze(-1)) for k, g in zip(keys, grads)}


TARGETS = {"influence": branch_influence, "attribution": branch_attribution}


def percentiles(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid value among the valid ones, scaled to [0, 1] (0 elsewhere)."""
    flat = values.masked_fill(~valid, float("inf")).flatten()
    rank = torch.empty_like(flat)
    rank[flat.argsort()] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    n = int(valid.sum())
    return (rank.view_as(values) / max(n - 1, 1)).clamp(max=1.0) * valid


def influence_loss(model, ids: torch.Tensor, mask: torch.Tensor, target: str = "influence") -> torch.Tensor:
    """Mean over modules of the squared error between each gate's importance and the
    percentile of its branch's influence (or attribution), over real tokens."""
    valid = mask.bool()
    first = torch.zeros_like(valid)
    first[torch.arange(len(valid)), valid.int().argmax(1)] = True
    bank: GateBank = model.gate_bank
    losses = []
    for key, (x, infl) in TARGETS[target](model, ids, mask).items():
        target = torch.where(first, 1.0, percentiles(infl, valid))
        branch, layer = key.split(".")
        imp = importance(bank.get(branch, int(layer))(x))
        losses.append(F.mse_loss(imp[valid], target[valid]))
    return torch.stack(losses).mean()
