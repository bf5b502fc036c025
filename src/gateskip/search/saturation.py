"""How far each decoder layer turns each token's hidden state, cos(layer input, layer output):
ShortGPT's Block Influence ranks layers by it, CALM exits a token once it saturates."""

from __future__ import annotations

import torch

from ..core.model import decoder_layers


@torch.no_grad()
def saturation(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """cos(layer input, layer output) per layer and token, (layers, B, T), from one dense forward."""
    layers = decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}

    def hook(index):
        def capture(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            seen[index] = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(layers))])


def block_influence(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """Block Influence per decoder layer: mean over real tokens of 1 - cos(layer input, layer output)."""
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return [float((1 - cos)[valid].mean()) for cos in saturation(model, ids, mask)]


def least_influential(model, sample: tuple[torch.Tensor, torch.Tensor], count: int) -> list[int]:
    """The `count` layers with the lowest Block Influence on the sample, least influential first."""
    scores = block_influence(model, *sample)
    return sorted(range(len(scores)), key=lambda i: scores[i])[:count]
