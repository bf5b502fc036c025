"""Gather kept tokens before a branch runs and scatter their outputs back.

One layout for every branch: per sequence, the kept positions left-aligned and padded to
a capacity K (B, K). Attention needs it (queries stay grouped by sequence to see the
right keys); token-wise branches (MLP) use it too, so that when K is known ahead (a
quantile budget knows every sequence's kept count from the padding alone) nothing waits
for the device to say how many tokens were kept.
"""

from __future__ import annotations

import torch


def pack_per_sequence(keep: torch.Tensor, capacity: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of kept tokens per sequence, left-aligned and padded to `capacity` slots.

    Returns index (B, K) into T (ascending within a row; padding slots point at 0) and
    slot_valid (B, K). capacity must be at least the largest kept count; None reads it
    from `keep` (one wait for the device).
    """
    counts = keep.sum(1)
    t = keep.shape[1]
    k = (int(counts.max().item()) if keep.numel() else 0) if capacity is None else min(capacity, t)
    # One top-k, not a sort: kept positions score t - position (the earliest highest), the rest 0.
    scores = keep.to(torch.int32) * torch.arange(t, 0, -1, dtype=torch.int32, device=keep.device)
    order = scores.topk(k, dim=1).indices
    slot_valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]
    return order.masked_fill(~slot_valid, 0), slot_valid


def gather_packed(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) gathered along T with index (B, K) -> (B, K, ...)."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def scatter_add_packed(h: torch.Tensor, index: torch.Tensor, slot_valid: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h (B, T, d) with y (B, K, d) added at the kept positions; padding slots add nothing."""
    y = (y * slot_valid.unsqueeze(-1).to(y.dtype)).to(h.dtype)
    return h.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]), y)
