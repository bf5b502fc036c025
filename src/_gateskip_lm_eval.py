"""Registers gateskip's lm-eval model type (`lm_eval --model gateskip`) when lm-eval loads its models.

lm-eval 0.4.13 reads no entry points: a model type has to be in its registry before lm-eval
looks it up, and lm-eval's CLI imports nothing of ours. Installing gateskip puts
`gateskip-lm-eval.pth` into site-packages (setup.py), which imports this module when Python
starts. It waits for `lm_eval.models` (lm-eval's list of model types, imported before any
lookup) and right after it adds a lazy entry for gateskip.evaluation.plugin:GateSkipLM, so
nothing heavy loads until a run asks for `--model gateskip`. Standard library only.
"""

from __future__ import annotations

import sys
import warnings

WATCHED = "lm_eval.models"
MODEL_TYPE = "gateskip"
TARGET = "gateskip.evaluation.plugin:GateSkipLM"


def register() -> None:
    """Add the lazy entry; a failure warns instead of breaking lm-eval for every other model."""
    try:
        from lm_eval.api.registry import model_registry

        if MODEL_TYPE not in model_registry:
            model_registry.register(MODEL_TYPE, target=TARGET)
    except Exception as e:  # noqa: BLE001 - e.g. a future lm-eval with another registry
        warnings.warn(f"gateskip could not register its lm-eval model type: {e}", stacklevel=2)


class _RegisterAfter:
    """Wraps lm_eval.models' loader: runs it, then register()."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module keeps its own loader
        self.loader.exec_module(module)
        register()


class _Watch:
    """A meta path finder that finds nothing itself: the other finders find lm_eval.models, it wraps the loader."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not cls else None
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisterAfter(spec.loader)
                return spec
        return None


if WATCHED in sys.modules:  # lm-eval loaded its models before this module was imported
    register()
elif _Watch not in sys.meta_path:
    sys.meta_path.insert(0, _Watch)
