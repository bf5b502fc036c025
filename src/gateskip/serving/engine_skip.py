"""One gated engine's skipping state: its gates, its budget, the context of each step, its counts.

Lives in vLLM's worker process beside the model. The counts accumulate over the engine's
life (gateskip.core.stats) and leave the worker three ways: `collective_rpc("gateskip_report")`
(report()), a log line every `log_interval` seconds, and the metrics file that `gateskip
serve`'s /metrics reads (gateskip.serving.metrics). A daemon thread writes those two; it
and the forward take turns through `lock`, so a report never reads counts mid-step and the
last steps before the engine goes idle are published too.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import torch
from vllm.distributed import get_tensor_model_parallel_rank
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger

from ..core.config import GateConfig
from ..core.flops import FlopReport, ModelDims, flop_report
from ..core.gates import GateBank
from ..core.plan import ForwardContext, SkipPlan
from ..core.stats import SkipStats
from .metrics import write_report
from .spec import EngineSpec, engine_budget, load_bank

log = init_logger("vllm.gateskip")  # under vLLM's logger: its handlers and format, in every process


class EngineSkip:
    """The gates (fp32, a GateBank), the target's budget and the counts of one engine's worker."""

    def __init__(self, spec: EngineSpec, hf_config):
        self.spec = spec
        self.bank = load_bank(spec.gates, hf_config)
        self.stats = SkipStats()
        self.plan = SkipPlan(budget=engine_budget(self.bank, spec.target), stats=self.stats)
        self.kv_less = kv_less(self.bank, self.plan.budget)  # layers whose attention has no KV cache here
        self.protect_first = not self.bank.config.skip_bos
        self.dims = ModelDims.from_config(hf_config)
        self.lock = threading.Lock()
        if spec.log_interval and _is_first_rank():
            threading.Thread(target=self._publish_every, args=(spec.log_interval,), daemon=True,
                             name="gateskip-metrics").start()

    def context(self, positions: torch.Tensor) -> ForwardContext:
        """The ForwardContext of one step over vLLM's flattened tokens (one row of N): every token is
        real, a token at position p sees p + 1 keys, and a sequence's first token is protected where
        the gates say so. Steps outside a real batch (vLLM's warm-up and profiling) count nothing."""
        n = positions.shape[-1]
        valid = torch.ones(1, n, dtype=torch.bool, device=positions.device)
        seen = (positions + 1).to(torch.float32)[None]
        first = positions == 0
        protect = first[None] if self.protect_first and bool(first.any()) else None
        counting = _in_real_step()
        self.plan.stats = self.stats if counting else None
        if counting:
            self.stats.record_forward(valid, seen)
        return ForwardContext(self.plan, self.bank, valid, seen, protect)

    def report(self) -> dict:
        """(Under `lock` where a publishing thread runs.) Counts so far and what they come to (FLOPs of the
        decoder layers as this engine spends them, gates included: engine_flops)."""
        flops = engine_flops(self.stats, self.dims, self.bank.config, self.kv_less)
        modules = {k: [c.seen, c.skipped] for k, c in self.stats.modules().items()}
        return {"target": self.spec.target, "tokens": flops.tokens, "skip_fraction": flops.paper_fraction,
                "net_saving": flops.net_saving, "net_saving_with_head": flops.net_saving_with_head, "modules": modules}

    def _publish_every(self, interval: float) -> None:
        published = -1
        while True:
            time.sleep(interval)
            with self.lock:
                if self.stats.forwards == published:
                    continue
                published, report = self.stats.forwards, self.report()
            log.info("gateskip: target %g: %d tokens, skipped %.1f%% of token x module evaluations, net FLOP "
                     "saving %.1f%% of decoder layers (%.1f%% with the LM head)", report["target"], report["tokens"],
                     100 * report["skip_fraction"], 100 * report["net_saving"], 100 * report["net_saving_with_head"])
            if self.spec.metrics_file:
                write_report(self.spec.metrics_file, report)


def kv_less(bank: GateBank, budget) -> set[int]:
    """Layers whose gated attention module the budget removes for every token it may skip: no query
    of the module reads keys, so the engine gives it no KV cache."""
    return {i for i in range(bank.num_layers) if bank.get("attn", i) is not None and budget.fixed(f"attn.{i}") is False}


def engine_flops(stats: SkipStats, dims: ModelDims, gate_config: GateConfig, kv_less: set[int]) -> FlopReport:
    """gateskip.core.flops' report, corrected to what the engine computes. gateskip.core.flops counts a token
    that skips attention as saving its q and o projections and its scores (what gateskip's own
    execution saves); in the engine a partly skipped attention module still projects queries and
    attends for every token (vLLM builds one attention metadata for all layers), so only o_proj is
    saved. An attention module with no KV cache (kv_less: removed by the target) computes no keys
    or values for any token that skips it."""
    report = flop_report(stats, dims, gate_config)
    q_proj = dims.attn_skippable_per_token / 2
    change = 0.0
    for key, c in stats.modules().items():
        branch, layer = key.split(".")
        if branch != "attn":
            continue
        if int(layer) in kv_less:
            change += (c.skipped - c.kv_skipped) * dims.attn_kv_per_token
        else:
            change -= c.skipped * q_proj + c.skipped_context * dims.attn_per_context
    return replace(report, skipped_flops=report.skipped_flops + change)


def _in_real_step() -> bool:
    """Whether this forward serves requests (vLLM's dummy runs carry no attention metadata)."""
    return is_forward_context_available() and get_forward_context().attn_metadata is not None


def _is_first_rank() -> bool:
    """One writer per engine: tensor-parallel ranks make the same decisions."""
    try:
        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # no parallel group set up
        return True
