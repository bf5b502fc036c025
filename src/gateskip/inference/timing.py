"""Wall-clock timing for side-by-side benchmarks on shared, noisy machines.

Candidates are timed in interleaved rounds (A B C, A B C, ...) and the median is
kept, so a burst of load from elsewhere hits every candidate alike.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(candidates: dict[str, Callable[[], object]], rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each candidate, measured in interleaved rounds."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
