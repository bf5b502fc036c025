"""What a training run is: every option of `gateskip train` in one checked TrainConfig, and
which of them a resumed run may change."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import checkpoint
from ..core.config import APPLICATIONS, GATE_KINDS
from ..data.textdata import BUNDLED
from ..errors import GateSkipError
from ..validate import MAX_SEED
from .losses import check_sparsity_kind

MODES = ("full", "frozen", "lora")
OBJECTIVES = ("lm", "influence", "attribution")
LOCAL_OBJECTIVES = ("influence", "attribution")  # gates regress a measured target: frozen backbone, unit gates
PRECISIONS = ("auto", "no", "bf16", "fp16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What a run writes into its folder: only overwrite replaces it.
RUN_FILES = ("final", "metrics.jsonl", "train_config.json", checkpoint.FOLDER)
# Options that may change when a run is resumed; any other difference is refused.
RESUMABLE_CHANGES = ("steps", "resume", "save_every", "eval_every", "eval_blocks", "keep_checkpoints", "max_minutes",
                     "overwrite")


@dataclass
class TrainConfig:
    """Everything a training run needs. lr=None picks 1e-5 for full fine-tuning, 1e-4 for LoRA."""

    model: str = "smollm2-135m"
    out: str = "runs/gateskip"
    data: list[str] = field(default_factory=lambda: [BUNDLED])
    steps: int = 1000
    mode: str = "full"
    gate_kind: str = "lowrank"
    rank: int = 32
    gate_application: str = "unit"  # "soft" scales kept outputs by the gates (the paper); "unit" keeps the base intact
    objective: str = "lm"  # "lm": end-to-end losses below; "influence"/"attribution": gates regress a target (frozen, unit)
    protect_first_token: bool = False
    init_gates: str | None = None  # start from this gate file (its gate options and allocations win)
    allocation: list[float] = field(default_factory=list)  # train under these stored allocations, in turn
    sparsity_weight: float = 0.1
    sparsity_loss: str = "l2"
    sparsity_target: float = 0.0
    target_skip: float = 0.2
    ramp_steps: int | None = None  # None: half of the steps
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    gate_lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup_steps: int = 0
    grad_clip: float = 1.0
    distill_weight: float = 0.0
    lora_rank: int = 16
    pack: bool = True
    val_fraction: float = 0.05
    max_tokens: int | None = None
    eval_every: int = 0  # 0: validate at the end only
    eval_blocks: int = 32
    save_every: int = 0  # 0: checkpoint only on Ctrl-C
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 0
    mixed_precision: str = "auto"
    max_minutes: float | None = None  # stop (validate, export) at this wall-clock limit
    overwrite: bool = False  # start over in an `out` that holds a run (its checkpoints and export are removed)

    def __post_init__(self) -> None:
        check_sparsity_kind(self.sparsity_loss)
        choices = {"mode": MODES, "gate_kind": GATE_KINDS, "mixed_precision": PRECISIONS, "objective": OBJECTIVES,
                   "gate_application": APPLICATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise GateSkipError(f"unknown {name.replace('_', ' ')} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        positive = ("steps", "seq_len", "batch_size", "grad_accum", "rank", "lora_rank", "eval_blocks", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise GateSkipError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.target_skip <= 1.0:
            raise GateSkipError(f"target skip must be a ratio in [0, 1], got {self.target_skip}")
        if not 0.0 <= self.sparsity_target < 1.0:
            raise GateSkipError(f"sparsity target must be a gate value in [0, 1), got {self.sparsity_target}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise GateSkipError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if not self.data:
            raise GateSkipError("no training data given")
        if self.objective in LOCAL_OBJECTIVES and (self.mode != "frozen" or self.gate_application != "unit"):
            raise GateSkipError(f"the {self.objective} objective trains unit gates on a frozen backbone: "
                                "use --mode frozen --gate-application unit")
        outside = [t for t in self.allocation if not 0.0 <= t < 1.0]  # NaN fails both comparisons
        if outside:
            raise GateSkipError(f"an allocation target is a net saving in [0, 1), got {outside[0]}")
        if self.allocation and (self.init_gates is None or self.objective != "lm"):
            raise GateSkipError("training under an allocation continues gates that have one: give --init-gates "
                                "with allocations (gateskip allocate) and the lm objective")
        # None means "the default" for lr, ramp_steps, max_tokens and max_minutes; NaN and inf mean nothing.
        above = {"lr": 0, "gate_lr": 0, "grad_clip": 0, "max_minutes": 0}
        at_least = {"sparsity_weight": 0, "weight_decay": 0, "distill_weight": 0, "warmup_steps": 0,
                    "ramp_steps": 0, "eval_every": 0, "save_every": 0, "seed": 0, "max_tokens": 1}
        for name, low in {**above, **at_least}.items():
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < low or (name in above and value == low)):
                bound = "positive" if name in above else f"at least {low:g}"
                raise GateSkipError(f"{name.replace('_', ' ')} must be {bound} and finite, got {value}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed > MAX_SEED:
            raise GateSkipError(f"seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        if self.resume and self.overwrite:
            raise GateSkipError("resume continues the run in --out and overwrite starts it over: give one of them")

    @property
    def backbone_lr(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.mode == "lora" else 1e-5)

    def skip_ratio(self, step: int) -> float:
        """Per-module skip ratio of a step: a linear ramp from 0 to the target, then flat."""
        ramp = self.steps // 2 if self.ramp_steps is None else self.ramp_steps
        if ramp <= 0:
            return self.target_skip
        return self.target_skip * min(1.0, step / ramp)
