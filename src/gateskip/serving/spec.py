"""What a gated engine runs: which gates, at which target, checked before any engine starts.

One `EngineSpec` travels from the user's command (`gateskip serve`, `gated_llm`) to the model
inside vLLM's worker processes as `hf_overrides={"gateskip": spec.to_dict()}`, which vLLM
writes onto the model's config. A folder holding gateskip.safetensors needs no spec: the
worker finds the gates beside the weights and takes the target from GATESKIP_TARGET (the one
way to choose it through tools that only take a model path, such as `lm_eval --model vllm`).
Standard library, safetensors and gateskip's core only: the server process imports this
before vLLM.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.budget import AllocationBudget, ThresholdBudget, check_ratio
from ..core.config import GateConfig
from ..core.gates import GateBank
from ..core.model import GATE_FILE, SUPPORTED_MODEL_TYPES, _gate_file, check_allocation_modules, check_gates_fit, read_gate_file
from ..errors import GateSkipError
from ..inference.calibrate import allocation_budget
from ..inference.calibrate import threshold_budget

TARGET_ENV = "GATESKIP_TARGET"
CONFIG_KEY = "gateskip"  # the attribute of the model's config that carries the spec


@dataclass(frozen=True)
class EngineSpec:
    """gates: the gate file; target: the net-saving target of a stored allocation (or a calibrated
    skip ratio for gates without allocations); metrics_file: where the worker writes its counts
    for the server's /metrics (None: nowhere); log_interval: seconds between log lines (0: never)."""

    gates: str
    target: float = 0.0
    metrics_file: str | None = None
    log_interval: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, hf_config, model_folder: str | None) -> "EngineSpec | None":
        """The spec a worker runs: the one its config carries, else gates found beside the weights
        (target from GATESKIP_TARGET, else 0), else None (a model without gates: stock vLLM)."""
        given = getattr(hf_config, CONFIG_KEY, None)
        if isinstance(given, dict) and given.get("gates"):
            return cls(**given)
        if model_folder and (Path(model_folder) / GATE_FILE).is_file():
            return cls(str(Path(model_folder) / GATE_FILE), env_target())
        return None


def env_target() -> float:
    """The target GATESKIP_TARGET names (0 when unset), as a one-line error when it is not a ratio."""
    raw = os.environ.get(TARGET_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        return check_ratio(float(raw))
    except (ValueError, GateSkipError):
        raise GateSkipError(f"{TARGET_ENV}={raw!r} is not a net-saving target in [0, 1]") from None


def load_bank(gates: str | os.PathLike, hf_config) -> GateBank:
    """The GateBank of a gate file (fp32, on the CPU), with its thresholds and allocations, after
    checking that the gates were made for this model (hf_config) and that vLLM's engine serves it."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:  # vLLM runs Mistral as Llama; Qwen2 and Gemma3 have their own classes
        raise GateSkipError(f"gateskip's vLLM engine serves {', '.join(SUPPORTED_MODEL_TYPES)} models, "
                            f"not {model_type!r}")
    meta, tensors = read_gate_file(gates)
    where = str(_gate_file(gates))
    check_gates_fit(meta, model_type, hf_config.num_hidden_layers, hf_config.hidden_size, where)
    bank = GateBank(meta["num_layers"], meta["hidden_size"], GateConfig.from_dict(meta["gate_config"]))
    check_allocation_modules(meta.get("allocations", {}), bank.module_keys(), where)
    bank.load_state_dict(tensors, strict=True)
    bank.thresholds = {k: dict(v) for k, v in meta.get("thresholds", {}).items()}
    bank.allocations = {k: dict(v) for k, v in meta.get("allocations", {}).items()}
    return bank.float().eval()


def engine_budget(bank: GateBank, target: float) -> AllocationBudget | ThresholdBudget:
    """Per-token decisions by calibrated thresholds (design.md section 7): the stored allocation's
    for a net-saving target, or the calibrated thresholds of a skip ratio for gates without
    allocations. Never a quantile: that would make a token depend on its batch-mates."""
    target = check_ratio(target)
    if bank.allocations:
        return allocation_budget(bank, target, decoding=True)
    return threshold_budget(bank, target)


def resolve(model_folder: str, gates: str | os.PathLike | None, target: float) -> EngineSpec | None:
    """Check a model folder, its gates and a target before an engine starts: the EngineSpec to run,
    or None for a folder without gates at target 0 (stock vLLM)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(model_folder)
    except (OSError, ValueError) as e:
        raise GateSkipError(f"cannot read the model's config in {model_folder}: {str(e).splitlines()[0]}") from None
    if gates is None and (Path(model_folder) / GATE_FILE).is_file():
        gates = Path(model_folder) / GATE_FILE
    if gates is None:
        if check_ratio(target) > 0:
            raise GateSkipError(f"target {target:g} needs gates: {model_folder} holds no {GATE_FILE}; pass --gates PATH")
        return None
    engine_budget(load_bank(gates, hf_config), target)  # a target with no stored allocation is refused here
    return EngineSpec(str(_gate_file(gates).resolve()), float(target))


def overrides(spec: EngineSpec | None) -> dict:
    """vLLM's hf_overrides for a spec (none for a model without gates)."""
    return {} if spec is None else {CONFIG_KEY: spec.to_dict()}


def describe(spec: EngineSpec | None) -> str:
    return "no gates (stock vLLM)" if spec is None else f"gates {spec.gates} at target {spec.target:g}"


def dumps(spec: EngineSpec | None) -> str:
    """The --hf-overrides value vLLM's command line takes."""
    return json.dumps(overrides(spec))
