"""vLLM worker extension (`worker_extension_cls`): lets the engine's owner ask each worker for its
skip counts by name (`LLM.collective_rpc("gateskip_report")`), without pickled functions."""

from __future__ import annotations


class GateSkipWorker:
    def gateskip_report(self) -> dict | None:
        model = self.get_model()
        return model.gateskip_report() if hasattr(model, "gateskip_report") else None
