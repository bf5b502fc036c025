"""Gate configuration: what kind of gate sits on which branches, and how it starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import GateSkipError

GATE_KINDS = ("vector", "scalar", "lowrank")
BRANCHES = ("attn", "mlp")
APPLICATIONS = ("soft", "unit")


@dataclass(frozen=True)
class GateConfig:
    """How gates are built. Defaults follow the paper (vector gate, both branches).

    kind: "vector" (d -> d), "scalar" (d -> 1) or "lowrank" (d -> rank -> d).
    branches: which branches get a gate ("attn", "mlp" or both).
    shared: one gate per branch shared by every layer instead of one per layer.
    detach_input: the gate reads a detached copy of the branch input, so the
        sparsity loss does not pull on the backbone's representations.
    init_std, init_bias: N(0, init_std) weights and bias 5 start gates almost open
        (sigmoid(5) = 0.993), so the gated model begins close to the original.
    skip_bos: whether the first token of a sequence may be skipped (the paper: yes). It
        travels with the gates, because gates trained with the first token protected
        have never learned to keep it: position 0 is the attention sink, and skipping it
        costs far more than any other token (docs/architecture.md).
    application: how a kept token's branch output enters the residual stream
        (design.md section 5). "soft" scales it by the gate, as the paper: the model differs
        from the base even when nothing is skipped. "unit" adds it unscaled (the gate only
        ranks tokens; training keeps a gradient into it through a straight-through factor
        whose forward value is exactly 1), so at budget 0 the model is the base bit for bit.
        Files written before the option existed hold soft gates.
    """

    kind: str = "vector"
    rank: int = 32
    branches: tuple[str, ...] = BRANCHES
    shared: bool = False
    detach_input: bool = True
    init_std: float = 0.01
    init_bias: float = 5.0
    skip_bos: bool = True
    application: str = "soft"

    def __post_init__(self) -> None:
        if isinstance(self.branches, str) or not isinstance(self.branches, (tuple, list)):
            raise GateSkipError(f"GateConfig branches must be a tuple or list drawn from {BRANCHES}, got {self.branches!r}")
        object.__setattr__(self, "branches", tuple(self.branches))
        for name in ("kind", "application"):
            if not isinstance(getattr(self, name), str):
                raise GateSkipError(f"GateConfig {name} must be a string, got {getattr(self, name)!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise GateSkipError(f"GateConfig rank must be a positive integer, got {self.rank!r}"
                                + (f" ({type(self.rank).__name__})" if not isinstance(self.rank, int) else ""))
        for name in ("shared", "detach_input", "skip_bos"):
            if not isinstance(getattr(self, name), bool):
                raise GateSkipError(f"GateConfig {name} must be True or False, got {getattr(self, name)!r}")
        for name, low in (("init_std", 0.0), ("init_bias", -math.inf)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < low:
                bound = " of at least 0" if low == 0.0 else ""
                raise GateSkipError(f"GateConfig {name} must be a finite number{bound}, got {value!r}")
        if self.kind not in GATE_KINDS:
            raise GateSkipError(f"unknown gate kind {self.kind!r}; choose one of {', '.join(GATE_KINDS)}")
        if not self.branches or any(b not in BRANCHES for b in self.branches):
            raise GateSkipError(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches}")
        if self.application not in APPLICATIONS:
            raise GateSkipError(f"unknown gate application {self.application!r}; choose one of {', '.join(APPLICATIONS)}")
        if self.kind == "lowrank" and (not isinstance(self.rank, int) or self.rank <= 0):
            raise GateSkipError(f"low-rank gate rank must be a positive integer, got {self.rank}")

    @property
    def unit(self) -> bool:
        return self.application == "unit"

    def check_width(self, hidden_size: int) -> None:
        """Rank is bounded by the model width, known only once a model is at hand."""
        if self.kind == "lowrank" and self.rank > hidden_size:
            raise GateSkipError(f"low-rank gate rank {self.rank} exceeds the model width {hidden_size}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["branches"] = list(self.branches)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
