"""Gather kept tokens before a branch runs and scatter their outputs back.

Two layouts: flat rows (N, d) for token-wise branches (MLP, projections), and a
per-sequence packed layout (B, K) for attention, whose queries must stay grouped
by sequence to see the right keys.
"""

from __future__ import annotations

import torch


def kept_rows(keep: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of kept tokens in a (B, T) mask, batch-major, ascending."""
    return keep.reshape(-1).nonzero().squeeze(1)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, T, d) -> (N, d): the kept tokens."""
    return x.reshape(-1, x.shape[-1]).index_select(0, rows)


def scatter_add_rows(h: torch.Tensor, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h with y (N, d) added at the kept tokens; every other token passes through unchanged."""
    return h.reshape(-1, h.shape[-1]).index_add(0, rows, y.to(h.dtype)).view_as(h)


def pack_per_sequence(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of kept tokens per sequence, left-aligned and padded to the longest.

    Returns index (B, K) into T (ascending within a row; padding slots point at 0) and
    slot_valid (B, K). Rows of `packed[slot_valid]` come out in kept_rows(keep) order.
    """
    counts = keep.sum(1)
    k = int(counts.max().item()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    slot_valid = torch.arange(k, device=keep.device)[None, :] < counts[:, None]
    return order.masked_fill(~slot_valid, 0), slot_valid


def gather_packed(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) gathered along T with index (B, K) -> (B, K, ...)."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)
