"""A forward-only objective for unit gates: rank tokens by what each branch does to them.

Unit gates only rank tokens (the kept outputs enter unscaled), so a gate needs to know,
from its branch input alone, how much the branch would change a token's residual stream.
One dense forward of the frozen base measures it for every module at once,

    influence[t, m] = ||o_t|| / ||h_t||      (o: branch output as added, h: residual before it)

and each gate regresses its importance onto the within-batch percentile of that influence
(only the order matters: budgets take quantiles, thresholds are calibrated). No backward
pass through the model is needed, so a step costs one forward plus the gates' own work.
The first real token of every sequence (the attention sink) is given the top percentile.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gates import GateBank, importance
from .layer import branch_norms
from .model import decoder_layers


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
    for i, layer in enumerate(decoder_layers(model)):
        for branch, (norm_in, norm_out) in branch_norms(layer).items():
            if bank.get(branch, i) is None:
                continue
            handles.append(norm_in.register_forward_hook(capture((branch, i), take_input=True)))
            module = norm_out if norm_out is not None else (layer.self_attn if branch == "attn" else layer.mlp)
            handles.append(module.register_forward_hook(capture((branch, i))))
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


def percentiles(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank of each valid value among the valid ones, scaled to [0, 1] (0 elsewhere)."""
    flat = values.masked_fill(~valid, float("inf")).flatten()
    rank = torch.empty_like(flat)
    rank[flat.argsort()] = torch.arange(flat.numel(), dtype=flat.dtype, device=flat.device)
    n = int(valid.sum())
    return (rank.view_as(values) / max(n - 1, 1)).clamp(max=1.0) * valid


def influence_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over modules of the squared error between each gate's importance and the
    percentile of its branch's influence, over real tokens."""
    valid = mask.bool()
    first = torch.zeros_like(valid)
    first[torch.arange(len(valid)), valid.int().argmax(1)] = True
    bank: GateBank = model.gate_bank
    losses = []
    for key, (x, infl) in branch_influence(model, ids, mask).items():
        target = torch.where(first, 1.0, percentiles(infl, valid))
        branch, layer = key.split(".")
        imp = importance(bank.get(branch, int(layer))(x))
        losses.append(F.mse_loss(imp[valid], target[valid]))
    return torch.stack(losses).mean()
