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
        """Sum the queued masks, a few tensor operations per run of entries of one shape (a decode
        step's modules are one run) rather than per entry: folding is not what a step waits on."""
        pending, self._pending = self._pending, []
        start = 0
        for end in range(1, len(pending) + 1):
            if end == len(pending) or _kind(pending[end]) != _kind(pending[start]):
                self._fold_run(pending[start:end])
                start = end

    def _fold_run(self, run: list[tuple]) -> None:
        valid = torch.stack([e[1] for e in run]).flatten(1)
        context = torch.stack([e[3] for e in run]).flatten(1).double()
        if run[0][0] is None:
            row = torch.stack([valid.sum().double(), (context * valid).sum()])
            self._totals = row if self._totals is None else self._totals + row
            return
        skipped = valid & ~torch.stack([e[2] for e in run]).flatten(1)
        seen, n_skipped = valid.sum(1).double(), skipped.sum(1).double()
        flags = torch.tensor([[e[4], e[5]] for e in run], dtype=torch.float64, device=valid.device)
        rows = torch.stack([seen, n_skipped, (context * skipped).sum(1), seen * flags[:, 0], n_skipped * flags[:, 1]], 1)
        keys = list(dict.fromkeys(e[0] for e in run))
        index = {k: i for i, k in enumerate(keys)}
        sums = rows.new_zeros(len(keys), rows.shape[1]).index_add_(
            0, torch.tensor([index[e[0]] for e in run], device=rows.device), rows)
        for key, row in zip(keys, sums):
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
            from ..errors import GateSkipError

            raise GateSkipError(f"no module {key!r} was recorded; recorded: {', '.join(modules) or 'none'}")
        c = modules[key]
        return c.skipped / c.seen if c.seen else 0.0


def _kind(entry: tuple) -> tuple:
    """Entries that fold together: forward or module records over masks of one shape and device."""
    return entry[0] is None, entry[1].shape, entry[1].device


@dataclass(frozen=True)
class ModuleCount:
    seen: int
    skipped: int
    skipped_context: float
    gate_evaluations: int = 0
    kv_skipped: int = 0
