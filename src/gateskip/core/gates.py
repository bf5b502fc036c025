"""Residual gates: g(x) = sigmoid(W x + b) scales a branch's output per token.

Importance of a token at a gated module is the mean of its gate vector; budgets
rank tokens by it.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import GateConfig


class Gate(nn.Module):
    """sigmoid(f(x)) where f is a vector (d->d), scalar (d->1) or low-rank (d->r->d) map."""

    def __init__(self, hidden_size: int, config: GateConfig):
        super().__init__()
        self.kind = config.kind
        self.detach_input = config.detach_input
        if config.kind == "lowrank":
            self.down = nn.Linear(hidden_size, config.rank, bias=False)
            self.up = nn.Linear(config.rank, hidden_size)
            nn.init.normal_(self.down.weight, std=config.init_std)
            nn.init.normal_(self.up.weight, std=config.init_std)
            nn.init.constant_(self.up.bias, config.init_bias)
        else:
            out = hidden_size if config.kind == "vector" else 1
            self.proj = nn.Linear(hidden_size, out)
            nn.init.normal_(self.proj.weight, std=config.init_std)
            nn.init.constant_(self.proj.bias, config.init_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate values with the shape of x (vector, low-rank) or x[..., :1] (scalar), in x's dtype."""
        if self.detach_input:
            x = x.detach()
        dtype = x.dtype
        x = x.to(self._weight_dtype())
        z = self.up(self.down(x)) if self.kind == "lowrank" else self.proj(x)
        return torch.sigmoid(z).to(dtype)

    def _weight_dtype(self) -> torch.dtype:
        return (self.up if self.kind == "lowrank" else self.proj).weight.dtype


def importance(gate_values: torch.Tensor) -> torch.Tensor:
    """Token importance: mean gate value over hidden dims, (..., d) -> (...)."""
    return gate_values.float().mean(dim=-1)


class GateBank(nn.Module):
    """All gates of a model, addressed by (branch, layer). Lives beside the HF modules,
    so the original module names and weights are untouched and the gates save alone."""

    def __init__(self, num_layers: int, hidden_size: int, config: GateConfig):
        super().__init__()
        config.check_width(hidden_size)
        self.config = config
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        # Calibrated importance thresholds: {target ratio as text: {module key: threshold}}.
        self.thresholds: dict[str, dict[str, float]] = {}
        # Allocations: {net saving target as text: {"ratios", "thresholds", "saving", "kl"}} (gateskip.search.allocation).
        self.allocations: dict[str, dict] = {}
        n = 1 if config.shared else num_layers
        self.gates = nn.ModuleDict(
            {b: nn.ModuleList(Gate(hidden_size, config) for _ in range(n)) for b in config.branches}
        )

    def get(self, branch: str, layer: int) -> Gate | None:
        """The gate of a branch at a layer, or None where that branch is not gated."""
        if branch not in self.gates:
            return None
        return self.gates[branch][0 if self.config.shared else layer]

    def module_keys(self) -> list[str]:
        """Names of gated modules ("attn.0", "mlp.0", ...) in layer order."""
        return [f"{b}.{i}" for i in range(self.num_layers) for b in ("attn", "mlp") if b in self.gates]
