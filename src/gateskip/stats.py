"""Skip statistics: what a forward (or a whole generation) computed and skipped.

Counts accumulate as tensors on the model's device, so recording never forces a
host sync; they are read once, when a report is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class SkipStats:
    """Counts per gated module. Pass one in a SkipPlan to have it filled in place.

    tokens: valid (non-padding) tokens that went through the model.
    context: sum over those tokens of the number of keys each attended to.
    per module key ("attn.3", "mlp.3"): [tokens seen, skipped, context of skipped, gate
    evaluations, tokens whose keys and values were not computed either (a removed attention
    module with no cache to fill)].

    Recording only queues the masks (no device work in the forward, which matters in a decode
    step of 60 modules); they are folded into the totals in one batch when a figure is read
    or the queue grows long.
    """

    FOLD_EVERY = 4096

    def __init__(self) -> None:
        self._totals: torch.Tensor | None = None  # [tokens, context]
        self._modules: dict[str, torch.Tensor] = {}
        self._pending: list[tuple] = []
        self.forwards = 0

    def record_forward(self, valid: torch.Tensor, context: torch.Tensor) -> None:
        self._queue((None, valid, None, context, False, False))
        self.forwards += 1

    def record_module(self, key: str, valid: torch.Tensor, keep: torch.Tensor, context: torch.Tensor,
                      gated: bool = True, kv_skipped: bool = False) -> None:
        self._queue((key, valid, keep, context, gated, kv_skipped))

    def _queue(self, entry: tuple) -> None:
        self._pending.append(entry)
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        for key, valid, keep, context, gated, kv_skipped in pending:
            if key is None:
                row = torch.stack([valid.sum(), (context * valid).sum()]).double()
                self._totals = row if self._totals is None else self._totals + row
                continue
            skipped = valid & ~keep
            seen, n_skipped = valid.sum(), skipped.sum()
            row = torch.stack([seen, n_skipped, (context * skipped).sum(), seen * gated, n_skipped * kv_skipped]).double()
            self._modules[key] = self._modules[key] + row if key in self._modules else row

    @property
    def tokens(self) -> int:
        self._fold()
        return 0 if self._totals is None else int(self._totals[0].item())

    @property
    def context(self) -> float:
        self._fold()
        return 0.0 if self._totals is None else float(self._totals[1].item())

    def modules(self) -> dict[str, "ModuleCount"]:
        self._fold()
        out = {}
        for key, row in self._modules.items():
            seen, skipped, ctx, gated, kv = row.tolist()
            out[key] = ModuleCount(int(seen), int(skipped), ctx, int(gated), int(kv))
        return out

    def skip_fraction(self, key: str) -> float:
        modules = self.modules()
        if key not in modules:
            from .errors import GateSkipError

            raise GateSkipError(f"no module {key!r} was recorded; recorded: {', '.join(modules) or 'none'}")
        c = modules[key]
        return c.skipped / c.seen if c.seen else 0.0


@dataclass(frozen=True)
class ModuleCount:
    seen: int
    skipped: int
    skipped_context: float
    gate_evaluations: int = 0
    kv_skipped: int = 0
