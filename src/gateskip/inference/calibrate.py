"""Calibrate importance thresholds, so that a threshold budget skips a target ratio.

A threshold budget (skip iff importance < the module's threshold) is causal and
batch-independent, which is what cached decoding needs; the thresholds come from
sample text. The importances at module l depend on what earlier modules skipped, so
thresholds are set in execution order within one forward over the whole sample: each
module's threshold is the ratio-quantile of the importances it sees while every
earlier module already skips with its own calibrated threshold. Replayed on the sample
under the resulting ThresholdBudget, every module skips exactly its target share.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from tqdm import tqdm

from ..core.budget import AllocationBudget, ThresholdBudget, check_ratio
from ..core.gates import GateBank
from ..core.model import is_gated
from ..core.plan import SkipPlan
from ..errors import GateSkipError
from ..validate import existing_path, fits_context, integer, ratio, text_source, token_batch


def ratio_key(ratio: float) -> str:
    """How a target ratio is written as a key of `gate_bank.thresholds` ("0.25")."""
    return f"{check_ratio(ratio):g}"


@dataclass(frozen=True)
class _CalibratingBudget(ThresholdBudget):
    """A ThresholdBudget that sets a module's threshold the first time it runs, from the
    importances of that call, then applies it. Modules run in order, so each threshold is
    measured under the skipping of all earlier modules. `ratios` gives a module its own
    target (an allocation); other modules take `ratio`."""

    ratios: Mapping[str, float] | None = None

    def keep(self, imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, key: str) -> torch.Tensor:
        if key not in self.thresholds:
            ratio = self.ratio if self.ratios is None else self.ratios.get(key, 0.0)
            self.thresholds[key] = _quantile_threshold(imp, valid, protect, ratio)
        return super().keep(imp, valid, protect, key)


def _quantile_threshold(imp: torch.Tensor, valid: torch.Tensor, protect: torch.Tensor | None, ratio: float) -> float:
    """A threshold below which floor(ratio * valid tokens) of the skippable tokens fall.

    Midway between the last skipped and the first kept importance, so unseen text on
    either side of the boundary is treated evenly. Where the two are equal (a tie: at the first
    layer a token's importance depends on its id alone, so repeated tokens tie exactly), midway
    between the tied value and the next lower one: the tied tokens are kept, as a threshold at the
    tied value keeps them, but no token sits on the boundary, where float round-off (a batch of
    another size) would flip its decision.
    """
    skippable = valid if protect is None else valid & ~protect
    values = imp[skippable].double().sort().values
    k = min(math.floor(ratio * int(valid.sum()) + 1e-9), values.numel())
    if k == 0:
        return -math.inf
    if k == values.numel():
        return math.inf
    low, high = values[k - 1], values[k]
    if low == high:
        below = values[values < high]
        if below.numel() == 0:  # every skippable token ties: none skips, as at the tied value
            return float(high) - 1e-4 * max(abs(float(high)), 1e-3)
        low = below[-1]
    return float((low + high) / 2)


def tokenize_samples(tokenizer, texts: Sequence[str], max_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample texts -> (input_ids, attention_mask), right-padded and cut to max_length tokens."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise GateSkipError("tokenize_samples: texts must be a list of strings")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise GateSkipError("calibration needs some non-empty sample text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    from ..data.textdata import encode_batch

    return encode_batch(tokenizer, list(texts), max_length)


@torch.no_grad()
def calibrate(
    model,
    samples: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    ratios: Sequence[float],
    skip_bos: bool | None = None,
) -> dict[str, dict[str, float]]:
    """Thresholds for each target skip ratio, stored in `model.gate_bank.thresholds` and returned.

    samples: token ids (B, T), or (ids, attention_mask); see tokenize_samples for text. They
    run as one batch, so every threshold is a quantile over all sample tokens: a few
    thousand tokens are plenty.
    """
    if not is_gated(model):
        raise GateSkipError("calibration needs a model with gates (add_gates or load_gates first)")
    ids, mask = samples if isinstance(samples, (tuple, list)) and len(samples) == 2 else (samples, None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not (mask is None or isinstance(mask, torch.Tensor)):
        raise GateSkipError("calibrate: samples must be token ids (B, T) or (ids, attention_mask) tensors; "
                            "tokenize_samples or sample_tokens make them from text")
    try:
        ratios = list(ratios)
    except TypeError:
        ratios = None
    if ratios is None or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios):
        raise GateSkipError("calibrate: ratios must be a list of skip ratios, e.g. [0.25, 0.5]")
    if ids.numel() == 0 or (mask is not None and int(mask.sum()) == 0):
        raise GateSkipError("calibration needs at least one sample token")
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    found = {}
    for ratio in tqdm(list(ratios), desc="calibrating", unit="ratio", disable=len(ratios) < 2):
        budget = _CalibratingBudget(thresholds={}, ratio=check_ratio(ratio))
        model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=budget, skip_bos=skip_bos), logits_to_keep=1)
        found[ratio_key(ratio)] = dict(budget.thresholds)
    model.gate_bank.thresholds.update(found)
    return found


@torch.no_grad()
def calibrate_allocation(model, samples: tuple[torch.Tensor, torch.Tensor], allocations: dict[str, dict]) -> None:
    """Decoding thresholds for stored allocations: each partly skipped module's threshold is the
    quantile at its own ratio, set in execution order as `calibrate` does; kept in each entry."""
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in token_batch(samples, "samples"))
    for target, entry in allocations.items():
        ratios = entry["ratios"]
        budget = _CalibratingBudget(thresholds={}, ratio=float(target), ratios=ratios)
        model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=budget), logits_to_keep=1)
        entry["thresholds"] = {k: v for k, v in budget.thresholds.items() if 0.0 < ratios.get(k, 0.0) < 1.0}


def threshold_budget(gates, ratio: float) -> ThresholdBudget:
    """The calibrated ThresholdBudget for a target ratio. Ratio 0 needs no calibration.
    `gates` is a gated model or its GateBank."""
    ratio = check_ratio(ratio)
    bank = gates if isinstance(gates, GateBank) else getattr(gates, "gate_bank", None)
    if bank is None:
        raise GateSkipError("a threshold budget needs a model with gates")
    if ratio == 0.0:
        return ThresholdBudget({k: -math.inf for k in bank.module_keys()}, 0.0)
    stored = bank.thresholds
    key = ratio_key(ratio)
    if key not in stored:
        have = ", ".join(sorted(stored, key=float)) or "none"
        raise GateSkipError(
            f"budget {key} is not calibrated (calibrated: {have}); run `gateskip calibrate MODEL --gates PATH --ratios {key}`"
        )
    return ThresholdBudget(dict(stored[key]), ratio)


def allocation_budget(gates, target: float, decoding: bool = False) -> AllocationBudget:
    """The stored allocation for a net-saving target as a budget: per-module quantiles for
    scoring and prefill, or the calibrated per-module thresholds for cached decoding.
    `gates` is a gated model or its GateBank."""
    target = check_ratio(target)
    bank = gates if isinstance(gates, GateBank) else getattr(gates, "gate_bank", None)
    if bank is None:
        raise GateSkipError("an allocation budget needs a model with gates")
    if target == 0.0:
        return AllocationBudget({}, 0.0, {} if decoding else None)
    stored = bank.allocations
    key = ratio_key(target)
    if key not in stored:
        have = ", ".join(sorted(stored, key=float)) or "none"
        raise GateSkipError(f"no allocation stored for a net saving of {key} (stored: {have}); run "
                            f"`gateskip allocate MODEL --gates PATH --targets {key}`")
    entry = stored[key]
    if decoding and "thresholds" not in entry:
        raise GateSkipError(f"the allocation for {key} has no decoding thresholds; rerun `gateskip allocate`")
    return AllocationBudget(dict(entry["ratios"]), float(key), dict(entry["thresholds"]) if decoding else None)


def sample_tokens(tokenizer, source: str = "bundled", sequences: int = 16, length: int = 256,
                  skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of `sequences` blocks of `length` tokens from a text source that
    gateskip.data.textdata reads ("bundled" Shakespeare, a .txt/.jsonl file, a dataset folder),
    after passing over its first `skip` blocks (text another step used)."""
    from ..data import textdata

    if sequences < 1 or length < 1:
        raise GateSkipError(f"sample text needs at least one block of one token, got {sequences} x {length}")
    docs = textdata.read_documents(source)
    blocks = textdata.pack(textdata.tokenize(docs, tokenizer, max_tokens=(skip + sequences) * length), length)
    if len(blocks) <= skip:
        raise GateSkipError(f"{source} has fewer than {(skip + 1) * length} tokens of text; after passing over {skip} "
                            f"blocks of {length} there is no block left")
    return blocks.input_ids[skip:], blocks.attention_mask[skip:]


# CLI ---------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("calibrate", help="calibrate importance thresholds for target skip ratios")
    p.add_argument("model", help="bundled model name, local folder or hub id")
    p.add_argument("--gates", required=True, type=existing_path,
                   help="gate file or folder (thresholds are saved back into it)")
    p.add_argument("--ratios", type=ratio, nargs="+", required=True, help="target skip ratios, e.g. 0.25 0.5")
    p.add_argument("--text", default="bundled", type=text_source,
                   help="sample text: 'bundled', a .txt/.jsonl file or a dataset folder")
    p.add_argument("--sequences", type=integer(1), default=16, help="sample blocks")
    p.add_argument("--length", type=integer(1), default=256, help="tokens per sample block")
    p.add_argument("--overwrite", action="store_true", help="replace thresholds the gate file already holds for these ratios")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model
    from ..core.model import load_gates, update_gate_file, writable_gate_file

    writable_gate_file(args.gates)  # the thresholds are saved back into it: found writable first
    model, tokenizer = load_model(args.model)
    fits_context(model, args.length, "--length")
    load_gates(model, args.gates)
    before = {k: dict(v) for k, v in model.gate_bank.thresholds.items()}
    stored = [ratio_key(r) for r in args.ratios if ratio_key(r) in model.gate_bank.thresholds]
    if stored and not args.overwrite:
        raise GateSkipError(f"{args.gates} already holds thresholds for ratio {stored[0]}; pass --overwrite to replace them")
    samples = sample_tokens(tokenizer, args.text, args.sequences, args.length)
    found = calibrate(model, samples, args.ratios)
    path = update_gate_file(model, args.gates, "thresholds", found, before)
    print(f"calibrated ratios {', '.join(found)} on {int(samples[1].sum())} tokens of {args.text}; saved to {path}")
    return 0
