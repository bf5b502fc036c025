"""Calibration: thresholds that make a threshold budget skip the target ratio."""

import math

import pytest
import torch

from gateskip import GateSkipError, SkipPlan, SkipStats, ThresholdBudget, load_gates, save_gates
from gateskip.inference.calibrate import calibrate, ratio_key, threshold_budget
from test_generation import gated_tiny, random_prompts

VOCAB = 5000  # few repeated tokens: repeats tie exactly at the first module


def model_and_text(family, lengths, seed, model_seed=0):
    return gated_tiny(family, seed=model_seed, vocab=VOCAB), random_prompts(lengths, seed=seed, vocab=VOCAB)


def skip_fractions(model, ids, mask, budget) -> dict[str, float]:
    stats = SkipStats()
    with torch.no_grad():
        model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=budget, stats=stats))
    return {k: stats.skip_fraction(k) for k in model.gate_bank.module_keys()}


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.8])
def test_replaying_the_sample_skips_the_target_ratio_at_every_module(ratio):
    model, (ids, mask) = model_and_text("llama", [40, 33, 40, 25], seed=1)
    calibrate(model, (ids, mask), [ratio])
    n = int(mask.sum())
    for key, fraction in skip_fractions(model, ids, mask, threshold_budget(model, ratio)).items():
        assert abs(fraction - ratio) <= 2 / n, key


def test_thresholds_account_for_skipping_at_earlier_modules():
    """Quantiles measured with nothing skipped (the naive way) miss the target downstream."""
    model, (ids, mask) = model_and_text("llama", [60, 60, 60], seed=2)
    calibrate(model, (ids, mask), [0.5])
    sequential = skip_fractions(model, ids, mask, threshold_budget(model, 0.5))
    naive = {}
    for key in model.gate_bank.module_keys():  # each module alone skipping, all others dense
        alone = ThresholdBudget({k: (t if k == key else -math.inf) for k, t in model.gate_bank.thresholds["0.5"].items()})
        naive[key] = skip_fractions(model, ids, mask, alone)[key]
    assert max(abs(f - 0.5) for f in sequential.values()) <= 2 / int(mask.sum())
    # the calibrated thresholds, applied one module at a time, no longer hit the target:
    # proof that later thresholds were measured under earlier skipping
    assert max(abs(f - 0.5) for f in naive.values()) > 0.02


def test_held_out_text_skips_close_to_the_target():
    model, sample = model_and_text("qwen2", [64] * 8, seed=3)
    calibrate(model, sample, [0.25, 0.5])
    ids, mask = random_prompts([64] * 8, seed=4, vocab=VOCAB)
    for ratio in (0.25, 0.5):
        fractions = skip_fractions(model, ids, mask, threshold_budget(model, ratio))
        assert abs(sum(fractions.values()) / len(fractions) - ratio) < 0.06


def test_thresholds_are_saved_with_the_gates(tmp_path):
    model = gated_tiny("llama")
    calibrate(model, random_prompts([30, 30], seed=5), [0.25, 1.0])
    save_gates(model, tmp_path)
    other = gated_tiny("llama", seed=9)
    load_gates(other, tmp_path)
    assert other.gate_bank.thresholds == model.gate_bank.thresholds
    assert set(other.gate_bank.thresholds) == {"0.25", "1"}
    assert all(t == math.inf for t in other.gate_bank.thresholds["1"].values())


def test_budget_zero_needs_no_calibration_and_skips_nothing():
    model = gated_tiny("llama")
    ids, mask = random_prompts([20], seed=6)
    assert set(skip_fractions(model, ids, mask, threshold_budget(model, 0)).values()) == {0.0}


def test_bad_requests_give_clear_errors():
    model = gated_tiny("llama")
    calibrate(model, random_prompts([20], seed=7), [0.25])
    with pytest.raises(GateSkipError, match="not calibrated.*0.25"):
        threshold_budget(model, 0.5)
    with pytest.raises(GateSkipError, match=r"\[0, 1\]"):
        threshold_budget(model, 1.5)
    with pytest.raises(GateSkipError, match=r"\[0, 1\]"):
        calibrate(model, random_prompts([20]), [-0.1])
    with pytest.raises(GateSkipError, match="at least one sample token"):
        calibrate(model, (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)), [0.25])
    assert ratio_key(0.5) == "0.5" and ratio_key(0.25) == "0.25"


def test_a_tie_at_the_quantile_puts_the_threshold_between_distinct_values():
    """At the first layer a token's importance depends on its id alone, so repeated tokens tie exactly.
    A threshold on the tied value would leave those tokens on the boundary, where round-off (another
    batch size) flips them (issue 26: a batch decoded other tokens than its rows alone)."""
    from gateskip.core.gates import importance
    from gateskip.core.plan import GateTrace

    model = gated_tiny("llama")
    ids = torch.tensor([[5, 7, 9] * 4])  # 12 tokens, three importances at attn.0, four of each
    trace = GateTrace()
    with torch.no_grad():
        model(ids, skip_plan=SkipPlan(trace=trace))
    values = torch.unique(importance(trace.entries[0][1])[0].double()).tolist()  # sorted, distinct
    assert trace.entries[0][0] == "attn.0" and len(values) == 3
    threshold = calibrate(model, ids, [0.5])["0.5"]["attn.0"]  # the 6th and 7th lowest tie (the middle value)
    assert values[0] < threshold < values[1] and values[1] - threshold > 1e-4 * (values[1] - values[0])
    stats = SkipStats()
    with torch.no_grad():
        model(ids, skip_plan=SkipPlan(budget=threshold_budget(model, 0.5), stats=stats))
    assert stats.modules()["attn.0"].skipped == 4  # as a threshold on the tied value: the tied tokens are kept
