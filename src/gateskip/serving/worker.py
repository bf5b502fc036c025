"""vLLM worker extension (`worker_extension_cls`): lets the engine's owner ask each worker for its
skip counts by name (`LLM.collective_rpc("gateskip_report")`), without pickled functions."""

from __future__ import annotations


class GateSkipWorker:
    def gateskip_report(self) -> dict | None:
        model = self.get_model()
        return model.gateskip_report() if hasattr(model, "gateskip_report") else None

    def gateskip_kv_cache_layers(self) -> int:
        """How many attention layers vLLM gave a KV cache (a removed attention module has none)."""
        return len(self.model_runner.kv_caches)
