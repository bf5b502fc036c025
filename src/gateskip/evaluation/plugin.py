"""`lm_eval --model gateskip`: a gated model as one of lm-eval's model types.

lm-eval 0.4.13 finds model types only in its registry; it reads no entry points. So the
class is registered twice over: importing this module registers it (`@register_model`),
and the `gateskip-lm-eval.pth` that installing gateskip puts into site-packages registers
it lazily when lm-eval builds its model list (`_gateskip_lm_eval`), so lm-eval's own CLI
and `lm_eval.simple_evaluate(model="gateskip")` find it without importing gateskip first.

It is the GatedLM that `gateskip eval` scores with, built from `--model_args` instead of
from a model in memory, running one method at one budget for the whole lm-eval run. What
was skipped and saved goes into lm-eval's results, under `config.gateskip`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import replace

import torch
from lm_eval.api.registry import register_model

from ..core.budget import check_ratio
from ..core.flops import ModelDims, flop_report
from ..core.model import add_gates, is_gated, load_gates
from ..core.plan import EXECUTIONS
from ..core.stats import SkipStats
from ..data.samples import sample_batch
from ..errors import GateSkipError
from ..loading import load_model
from ..search.baselines import IDENTITY_GATES, make_method
from .batch import DEFAULT_BATCH_SIZE
from .harness import GatedLM

MODEL_TYPE = "gateskip"
PLUGIN_METHODS = ("gateskip", "base", "random", "shortgpt", "calm")  # mod needs a second gate file: gateskip eval
DTYPES = ("float32", "bfloat16", "float16")

# Under lm-eval's logger, so that lm-eval's CLI prints it with its own messages.
log = logging.getLogger("lm_eval.models.gateskip")


def _choice(value, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise GateSkipError(f"model_args {what}={value!r}: choose from {', '.join(choices)}")
    return value


def _usable_device(device: str | None) -> str:
    """The device to run on: CUDA when there is one (the default), else the CPU. lm-eval's CLI asks for
    cuda (cuda:0) unless told otherwise, so on a machine without a GPU a CUDA device falls back to the
    CPU with a warning rather than failing; any other device this machine lacks is an error."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return str(device)  # load_model names the problem
    if kind == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"no CUDA device for device={device} on this machine: gateskip runs on the CPU (pass "
                      "--device cpu to silence this)", stacklevel=3)
        return "cpu"
    return str(device)


@register_model(MODEL_TYPE)
class GateSkipLM(GatedLM):
    """`--model_args pretrained=SPEC,gates=PATH,budget=0.25,method=gateskip,execution=physical,dtype=float32`.

    pretrained: a bundled name, a local folder (a gated folder brings its gates) or a hub id;
    gates: a gate file or folder (with a LoRA adapter beside it, merged first); budget: the skip
    ratio, or the net-saving target when the gate file stores allocations; method: gateskip,
    base, random, shortgpt or calm (baselines run on identity gates, as in `gateskip eval`);
    sample_text: the paragraphs ShortGPT and CALM calibrate on (default: bundled SQuAD passages).
    """

    def __init__(self, pretrained: str, gates: str | None = None, budget: float = 0.0, method: str = "gateskip",
                 execution: str = "physical", dtype: str = "float32", device: str | None = None,
                 batch_size: int | str = DEFAULT_BATCH_SIZE, max_batch_size: int = 64, max_length: int | None = None,
                 seed: int = 0, sample_text: str | None = None):
        method, execution = _choice(method, "method", PLUGIN_METHODS), _choice(execution, "execution", EXECUTIONS)
        try:
            budget = check_ratio(float(budget))
        except (TypeError, ValueError):
            raise GateSkipError(f"model_args budget={budget!r} is not a skip ratio in [0, 1]") from None
        device = _usable_device(device)
        model, tokenizer = load_model(str(pretrained), dtype=getattr(torch, _choice(dtype, "dtype", DTYPES)),
                                      device=device)
        if gates is not None:
            load_gates(model, str(gates))
        if not is_gated(model):
            if method == "gateskip":
                raise GateSkipError("method gateskip needs gates: add gates=PATH to model_args, or give a gated "
                                    "model folder as pretrained")
            add_gates(model, IDENTITY_GATES)
        sample = sample_batch(tokenizer, sample_text, device) if method in ("shortgpt", "calm") else None
        self.method = make_method(method, model, sample, seed=int(seed))
        super().__init__(model, tokenizer, batch_size=batch_size, max_length=max_length, max_batch_size=max_batch_size)
        # The method's gates (identity ones for baselines) stay on the model for this LM's life.
        self._attached = contextlib.ExitStack()
        self._attached.enter_context(self.method.attached(model))
        self.stats = SkipStats()
        score, generate, self.decode_note = self.method.plans(budget, self.stats)
        self.use(replace(score, execution=execution), replace(generate, execution=execution))
        self.settings = {"pretrained": str(pretrained), "gates": None if gates is None else str(gates),
                         "method": method, "budget": budget, "execution": execution, "dtype": dtype}

    def skip_report(self) -> dict:
        """What the run skipped so far: the paper's fraction and the net FLOP saving (design.md, section 3)."""
        report = flop_report(self.stats, ModelDims.from_config(self.model.config),
                             self.method.bank.config if self.method.charge_gates else None)
        return {**self.settings, "skip_fraction": report.paper_fraction, "net_saving": report.net_saving,
                "net_saving_with_head": report.net_saving_with_head, "tokens": report.tokens,
                "decode": self.decode_note}

    def get_model_info(self) -> dict:
        # lm-eval calls this once, after evaluating, and merges it into results["config"].
        report = self.skip_report()
        log.info("gateskip: method %s at budget %g skipped %.1f%% of token x module evaluations; net FLOP saving "
                 "%.1f%% of decoder layers", report["method"], report["budget"], 100 * report["skip_fraction"],
                 100 * report["net_saving"])
        return {**super().get_model_info(), "gateskip": report}
