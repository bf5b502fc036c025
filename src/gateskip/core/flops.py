"""Honest accounting (design.md section 3): the paper's skip fraction and the net FLOP
saving against the ungated model, with the gates' own cost subtracted.

A multiply-add counts as 2 FLOPs. Decoder-layer FLOPs per token:
  attention: q and o projections 2*d*(H*D) each, k and v 2*d*(KV*D) each,
             scores and weighted sum 4*H*D*context (context = keys the query sees);
  MLP:       2*d*I per projection (3 for gated MLPs: gate, up, down).
A skipped attention token saves q, o, scores and weighted sum (k and v still run, except
in a removed module with no cache to fill); a skipped MLP token saves the whole MLP. Gates
cost only where they were evaluated (unit gates skip the gate of a module every token
runs or every token skips). Norms, RoPE and softmax are not counted.
The LM head (2*d*V per token) is reported separately, since prefill and decoding
compute it for different numbers of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GateSkipError
from .config import GateConfig
from .stats import SkipStats


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int
    vocab: int
    mlp_projections: int = 3

    @classmethod
    def from_config(cls, config) -> "ModelDims":
        needed = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
        missing = [name for name in needed if not isinstance(getattr(config, name, None), int)]
        if missing:
            raise GateSkipError(f"ModelDims.from_config needs a model config (model.config), got {type(config).__name__} "
                                f"without a whole-number {missing[0]}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
        )

    @property
    def attn_skippable_per_token(self) -> int:
        """q and o projections: the per-token attention work a skip saves, before scores."""
        return 2 * 2 * self.hidden * self.heads * self.head_dim

    @property
    def attn_kv_per_token(self) -> int:
        return 2 * 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def attn_per_context(self) -> int:
        """Scores plus weighted sum, per key a query attends to."""
        return 4 * self.heads * self.head_dim

    @property
    def mlp_per_token(self) -> int:
        return 2 * self.mlp_projections * self.hidden * self.intermediate

    @property
    def head_per_token(self) -> int:
        return 2 * self.hidden * self.vocab


def gate_flops_per_token(config: GateConfig, hidden: int) -> int:
    """One gate evaluation for one token (the sigmoid and the mean are not counted)."""
    if config.kind == "vector":
        return 2 * hidden * hidden
    if config.kind == "scalar":
        return 2 * hidden
    return 2 * hidden * config.rank * 2


@dataclass(frozen=True)
class FlopReport:
    tokens: int
    paper_fraction: float  # skipped token x module evaluations / all, attn and MLP weighted equally
    dense_flops: float  # ungated model, decoder layers, same tokens
    skipped_flops: float
    gate_flops: float
    head_flops: float

    @property
    def net_saving(self) -> float:
        """(skipped work - gate work) / ungated decoder-layer work; negative when gates cost more."""
        return (self.skipped_flops - self.gate_flops) / self.dense_flops if self.dense_flops else 0.0

    @property
    def net_saving_with_head(self) -> float:
        total = self.dense_flops + self.head_flops
        return (self.skipped_flops - self.gate_flops) / total if total else 0.0

    def summary(self) -> str:
        return (
            f"skipped {100 * self.paper_fraction:.1f}% of token x module evaluations; "
            f"net FLOP saving {100 * self.net_saving:.1f}% of decoder layers "
            f"({100 * self.net_saving_with_head:.1f}% with the LM head)"
        )


def flop_report(stats: SkipStats, dims: ModelDims, gate_config: GateConfig | None) -> FlopReport:
    """Turn counts recorded during forward passes into the two figures design.md asks for."""
    if not isinstance(stats, SkipStats):
        raise GateSkipError(f"flop_report: stats must be the gateskip.SkipStats a SkipPlan filled, got "
                            f"{type(stats).__name__}")
    if not isinstance(dims, ModelDims):
        raise GateSkipError(f"flop_report: dims must be a ModelDims (ModelDims.from_config(model.config)), got "
                            f"{type(dims).__name__}")
    if gate_config is not None and not isinstance(gate_config, GateConfig):
        raise GateSkipError(f"flop_report: gate_config must be the gates' GateConfig (model.gate_bank.config) or "
                            f"None, got {type(gate_config).__name__}")
    tokens, context = stats.tokens, stats.context
    per_token = dims.attn_skippable_per_token + dims.attn_kv_per_token + dims.mlp_per_token
    dense = dims.layers * (tokens * per_token + context * dims.attn_per_context)
    skipped = gate_evals = skipped_evals = 0.0
    for key, c in stats.modules().items():
        gate_evals += c.gate_evaluations
        skipped_evals += c.skipped
        if key.startswith("attn."):
            skipped += c.skipped * dims.attn_skippable_per_token + c.skipped_context * dims.attn_per_context
            skipped += c.kv_skipped * dims.attn_kv_per_token
        else:
            skipped += c.skipped * dims.mlp_per_token
    gates = gate_evals * gate_flops_per_token(gate_config, dims.hidden) if gate_config else 0.0
    evaluations = 2 * dims.layers * tokens
    return FlopReport(
        tokens=tokens,
        paper_fraction=skipped_evals / evaluations if evaluations else 0.0,
        dense_flops=float(dense),
        skipped_flops=float(skipped),
        gate_flops=float(gates),
        head_flops=float(tokens * dims.head_per_token),
    )
