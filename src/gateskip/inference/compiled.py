"""A compiled decode step: torch.compile on the dense compute of each module only.

Compiling a whole dense decode step took 512 s on a 2-core CPU for 1.19x (docs/speed.md),
and with skipping every module decision is a data-dependent branch that would break such a
graph 60 times a token. So the gate, the decision and the accounting stay in eager Python,
and only what runs between decisions is compiled: three small graphs that every layer shares
(a module's K/V, a kept query attending to the cache, the MLP). The attention graph keeps one
shape while the cache fills because it is handed the whole preallocated StaticKV with the
positions past its length masked (`StaticKV(whole=True)`, gpt-fast's layout). If
torch.compile fails, one warning, and the same functions run eagerly from then on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from ..core.execution import StepKernels, step_attend, step_keys, step_mlp


class Compiled:
    """fn through torch.compile (compiled at its first call), or eagerly once compiling has failed.

    A failure inside fn itself fails again eagerly, so nothing is hidden by the fallback."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled, self.failed = fn, None, False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn)
                return self.compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, say so once
                self.failed = True
                first = (str(e).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"torch.compile failed for {self.fn.__name__} ({type(e).__name__}: {first}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=2)
        return self.fn(*args)


KERNELS = StepKernels(keys=Compiled(step_keys), attend=Compiled(step_attend), mlp=Compiled(step_mlp))
