"""Methods a sweep compares, each one a way to turn a budget into a SkipPlan.

Every method runs through the same gated forward, physical execution and FLOP
accounting, so the curves are comparable:

- gateskip: the model's own gates rank tokens (per-sequence quantile; calibrated
  thresholds for decoding when the gate file has them). When the gate file stores
  allocations, a budget is a net-saving target and each module skips its allocated share.
- base: the ungated model (gates not applied, nothing skipped): the reference accuracy.
- random: the same number of tokens per module skipped, chosen at random: what the
  gates' ranking is worth.
- calm: CALM-style early exit: a token leaves the network once a layer barely changes
  its hidden state (saturation threshold set on sample text to meet the budget).
- mod: a Mixture-of-Depths-style router: scalar (linear d -> 1) gates trained with
  skipping but without the sparsity loss (`gateskip train --gate-kind scalar
  --sparsity-weight 0`), loaded from their own file and run like gateskip (per-sequence
  top-k through the quantile budget, branch output scaled by the router's sigmoid).
- shortgpt: static layer removal (Men et al., 2024): the round(budget * layers) layers
  with the lowest Block Influence 1 - cos(h_in, h_out) on sample text skip every token.
  `remove_layers` / `gateskip prune` delete them for real, e.g. before training gates.

Baselines run on the backbone with identity gates (scalar, exactly 1.0), so they change
nothing but which tokens skip, and the gates' cost is not charged to them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.budget import QuantileBudget, ThresholdBudget
from ..core.config import GateConfig
from ..core.gates import GateBank
from ..core.model import decoder_layers, is_gated
from ..core.plan import SkipPlan
from ..core.stats import SkipStats
from ..errors import GateSkipError
from ..files import MODEL_WEIGHTS, atomic_folder
from ..inference.calibrate import allocation_budget
from ..inference.calibrate import ratio_key
from ..validate import check_output_folder, existing_file, output_path
from .saturation import least_influential, saturation

METHODS = ("gateskip", "base", "random", "shortgpt", "calm", "mod")
PRUNED = "gateskip-pruned.json"  # what `gateskip prune` writes beside the pruned model

QUANTILE_DECODE = "per-sequence quantile in decoding: single-token steps skip nothing"

# sigmoid(50) is exactly 1.0 in fp32 and bf16: the gate multiplies by one.
IDENTITY_GATES = GateConfig(kind="scalar", init_std=0.0, init_bias=50.0)


def identity_bank(model) -> GateBank:
    """A gate bank that changes no output; it only lets budgets choose tokens to skip.

    It takes the first-token policy of the model's own gates, so a baseline may skip the
    first token exactly when the gates it is compared with may."""
    param = next(model.parameters())
    own = getattr(model, "gate_bank", None)
    config = IDENTITY_GATES if own is None else dataclasses.replace(IDENTITY_GATES, skip_bos=own.config.skip_bos)
    bank = GateBank(len(decoder_layers(model)), model.config.hidden_size, config)
    return bank.to(device=param.device, dtype=torch.float32)


@dataclass(frozen=True)
class RandomBudget(QuantileBudget):
    """A per-sequence quantile budget over random scores: skips exactly as many tokens as
    the gated quantile budget would, but chosen uniformly at random (seeded)."""

    seed: int = 0
    generator: torch.Generator = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "generator", torch.Generator().manual_seed(self.seed))

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        scores = torch.rand(imp.shape, generator=self.generator).to(imp.device)
        return super().keep(scores, valid, protect, key)


def layer_budget(module_keys: list[str], removed_layers: list[int], ratio: float) -> ThresholdBudget:
    """Whole-layer skipping as a threshold budget: +inf skips every token of a module, -inf none."""
    removed = {str(i) for i in removed_layers}
    return ThresholdBudget({k: math.inf if k.split(".")[1] in removed else -math.inf for k in module_keys}, ratio)


class ExitWatch:
    """CALM-style early exit (Schuster et al., 2022) with the hidden-state saturation measure.

    Pre-hooks on the decoder layers see each layer's input: a token exits before layer l once
    layer l-1 barely turned its hidden state, cos(h_in, h_out) >= threshold. From then on it
    skips every branch and its state is propagated (later layers still compute its K/V from
    it, as in CALM). Budgets cannot see hidden states, so the hooks decide and
    `ExitBudget` reads the decision.
    """

    def __init__(self) -> None:
        self.threshold = math.inf
        self.exited: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None
        self._handles: list = []

    def attach(self, model) -> None:
        self._handles = [layer.register_forward_pre_hook(self._see(i), with_kwargs=True)
                         for i, layer in enumerate(decoder_layers(model))]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self.exited, self._previous = [], None, None

    def _see(self, index: int):
        def see(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).float()
            if index == 0:
                self.exited = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
            else:
                self.exited = self.exited | (torch.nn.functional.cosine_similarity(self._previous, h, dim=-1) >= self.threshold)
            self._previous = h
        return see


@dataclass(frozen=True)
class ExitBudget(ThresholdBudget):
    """Skip the tokens that have exited (see ExitWatch); works in decode steps too."""

    watch: ExitWatch | None = None

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        keep = valid & ~self.watch.exited
        return keep if protect is None else keep | (valid & protect)


def exit_threshold(cos: torch.Tensor, ratio: float) -> float:
    """The saturation threshold at which the sample's tokens skip `ratio` of their layers.

    Estimated from a dense forward (cos: layers x tokens): a token exits at the first layer
    l >= 1 whose predecessor had cos >= threshold, and skips the remaining layers."""
    if ratio == 0:
        return math.inf
    layers = cos.shape[0]

    def skipped(threshold: float) -> float:
        crossed = torch.cat([torch.zeros_like(cos[:1], dtype=torch.bool), cos[:-1] >= threshold])
        exit_layer = torch.where(crossed.any(0), crossed.float().argmax(0), torch.full_like(cos[0], layers))
        return float((layers - exit_layer).mean() / layers)

    low, high = -1.0, 1.0 + 1e-6  # skipped() falls as the threshold rises
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if skipped(mid) > ratio else (low, mid)
    return high


@dataclass
class Method:
    """How one method runs at a budget: the gate bank to put on the model and the plans.

    `plans(budget)` returns (scoring plan, generation plan, note); the note says how
    decode steps were budgeted, which matters for generative tasks.
    """

    name: str
    bank: GateBank
    charge_gates: bool  # whether the gates' FLOPs count against this method
    layer_order: list[int] | None = None  # shortgpt: layers from least to most influential
    seed: int = 0
    sample_cos: torch.Tensor | None = None  # calm: saturation of the sample's real tokens (layers x tokens)
    watch: ExitWatch | None = None

    @contextlib.contextmanager
    def attached(self, model):
        """Put this method's gates (and, for calm, its exit hooks) on the model for a while;
        the model's own gates are back afterwards."""
        own = model.gate_bank
        model.gate_bank = self.bank
        if self.watch is not None:
            self.watch.attach(model)
        try:
            yield
        finally:
            if self.watch is not None:
                self.watch.detach()
            model.gate_bank = own

    def plans(self, budget: float, stats: SkipStats) -> tuple[SkipPlan, SkipPlan, str]:
        if self.name == "base":
            plan = SkipPlan(budget=None, apply_gates=False, stats=stats)
            return plan, plan, ""
        if self.name == "random":
            plan = SkipPlan(budget=RandomBudget(budget, seed=self.seed), stats=stats)
            return plan, plan, QUANTILE_DECODE
        if self.name == "shortgpt":
            n = round(budget * self.bank.num_layers)
            layers = layer_budget(self.bank.module_keys(), self.layer_order[:n], budget)
            plan = SkipPlan(budget=layers, skip_bos=True, stats=stats)  # removed layers see no token at all
            return plan, plan, f"{n} layers removed"
        if self.name == "calm":
            self.watch.threshold = exit_threshold(self.sample_cos, budget)
            plan = SkipPlan(budget=ExitBudget({}, budget, watch=self.watch), stats=stats)
            return plan, plan, f"exit at saturation cos >= {self.watch.threshold:.4f}, in decode steps too"
        if self.bank.allocations:  # the budget is a net-saving target, split by the stored allocation
            score = SkipPlan(budget=allocation_budget(self.bank, budget), stats=stats)
            decode = SkipPlan(budget=allocation_budget(self.bank, budget, decoding=True), stats=stats)
            return score, decode, "allocation: per-module quantiles in scoring, calibrated thresholds in decoding"
        score = SkipPlan(budget=budget, stats=stats)
        if budget == 0:  # gates applied, nothing skipped, in prefill and decoding alike
            return score, score, ""
        key = ratio_key(budget)
        if key in self.bank.thresholds:
            decode = SkipPlan(budget=ThresholdBudget(dict(self.bank.thresholds[key]), budget), stats=stats)
            return score, decode, "calibrated thresholds in decoding"
        return score, score, QUANTILE_DECODE + " (no calibrated thresholds for this budget)"


def make_method(name: str, model, sample: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0,
                router: GateBank | None = None) -> Method:
    """Build a method for a model that already carries its gates (learned ones for gateskip).

    `sample` (ids, mask) is the text ShortGPT and CALM calibrate on; `router` the gate bank
    of a MoD-style router (method mod)."""
    if name not in METHODS:
        raise GateSkipError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name == "mod":
        if router is None:
            raise GateSkipError("method mod needs a router: pass --router PATH (see docs/evaluation.md)")
        return Method(name, router, charge_gates=True)
    if name == "gateskip":
        if getattr(model, "gate_bank", None) is None:
            raise GateSkipError("method gateskip needs gates: pass --gates PATH (or --fresh-gates KIND)")
        return Method(name, model.gate_bank, charge_gates=True)
    bank = identity_bank(model)
    if name in ("base", "random"):
        return Method(name, bank, charge_gates=False, seed=seed)
    if sample is None:
        raise GateSkipError(f"{name} needs sample text (to rank layers / to set exit thresholds)")
    if name == "calm":
        cos = saturation(model, *sample)
        return Method(name, bank, charge_gates=False, sample_cos=cos[:, sample[1].bool()], watch=ExitWatch())
    order = least_influential(model, sample, len(decoder_layers(model)))
    return Method(name, bank, charge_gates=False, layer_order=order)


def remove_layers(model, layers: list[int]):
    """Delete decoder layers in place (ShortGPT pruning) and renumber the rest; returns the model.

    Prune before adding gates: the gates belong to the layers that remain."""
    if is_gated(model):
        raise GateSkipError("remove layers before adding gates (the gate bank is sized for the original depth)")
    old = decoder_layers(model)
    drop = set(layers)
    if not drop <= set(range(len(old))) or len(drop) >= len(old):
        raise GateSkipError(f"cannot remove layers {sorted(drop)} from a model with {len(old)} layers")
    model.model.layers = torch.nn.ModuleList(layer for i, layer in enumerate(old) if i not in drop)
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.layer_idx = i
    types = getattr(model.config, "layer_types", None)
    if types:
        model.config.layer_types = [t for i, t in enumerate(types) if i not in drop]
    model.config.num_hidden_layers = len(model.model.layers)
    return model


# CLI ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="remove the least influential layers (ShortGPT) and save the model")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--ratio", type=float, required=True, help="share of layers to remove, e.g. 0.25")
    p.add_argument("--out", type=output_path, required=True, help="folder for the pruned model (then: gateskip train OUT)")
    p.add_argument("--sample-text", type=existing_file, help="paragraphs (blank-line separated) to rank layers on")
    p.add_argument("--overwrite", action="store_true", help="replace a model in --out (never the source model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data.samples import sample_texts
    from ..loading import load_model, resolve_spec

    share = check_share(args.ratio)
    source = Path(resolve_spec(args.model))  # a bundled name, a folder or a hub id; a mistake is one line here
    if source.is_dir() and source.resolve() == args.out.expanduser().resolve():
        raise GateSkipError(f"--out {args.out} is the source model's folder; write the pruned model elsewhere")
    check_output_folder(args.out, writes=(PRUNED,), overwrite=args.overwrite)
    model, tokenizer = load_model(args.model)
    count = round(share * model.config.num_hidden_layers)
    from ..data.textdata import encode_batch

    removed = least_influential(model, encode_batch(tokenizer, sample_texts(args.sample_text), 256), count)
    remove_layers(model, removed)
    with atomic_folder(args.out, stale=MODEL_WEIGHTS) as folder:  # written whole beside --out, then moved in (config.json last)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / PRUNED).write_text(json.dumps({"source": args.model, "removed_layers": sorted(removed)}))
    print(f"removed layers {sorted(removed)}; saved {model.config.num_hidden_layers} layers to {args.out}")
    return 0


def check_share(ratio: float) -> float:
    if not 0.0 <= ratio < 1.0:
        raise GateSkipError(f"--ratio must be in [0, 1), got {ratio}")
    return ratio
