import pytest
import torch

from conftest import padded_batch, tiny_model
from gateskip import GateConfig, ModelDims, SkipPlan, SkipStats, add_gates, flop_report

# The tiny config: d=64, 4 heads of 16, 2 KV heads, MLP 96, 3 layers, vocab 101.
Q_OR_O = 2 * 64 * 64  # 8192
K_OR_V = 2 * 64 * 32  # 4096
MLP = 2 * 3 * 64 * 96  # 36864
PER_KEY = 4 * 4 * 16  # 256: scores and weighted sum, per key attended


def one_sequence_of_four_with_two_skips() -> SkipStats:
    """Each module skips tokens 1 and 3 of one 4-token sequence (contexts 1, 2, 3, 4)."""
    stats = SkipStats()
    valid = torch.ones(1, 4, dtype=torch.bool)
    context = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    keep = torch.tensor([[True, False, True, False]])
    stats.record_forward(valid, context)
    for layer in range(3):
        for branch in ("attn", "mlp"):
            stats.record_module(f"{branch}.{layer}", valid, keep, context)
    return stats


@pytest.mark.parametrize("kind,gate_per_token", [("vector", 2 * 64 * 64), ("scalar", 2 * 64), ("lowrank", 2 * 64 * 8 * 2)])
def test_flop_report_matches_a_hand_calculation(kind, gate_per_token):
    dims = ModelDims.from_config(tiny_model("llama").config)
    report = flop_report(one_sequence_of_four_with_two_skips(), dims, GateConfig(kind=kind, rank=8))

    dense_layer = 4 * (2 * Q_OR_O + 2 * K_OR_V + MLP) + (1 + 2 + 3 + 4) * PER_KEY
    skipped_layer = 2 * (2 * Q_OR_O) + (2 + 4) * PER_KEY + 2 * MLP
    gates_layer = 2 * 4 * gate_per_token  # two gated modules, four tokens each
    assert report.dense_flops == 3 * dense_layer
    assert report.skipped_flops == 3 * skipped_layer
    assert report.gate_flops == 3 * gates_layer
    assert report.paper_fraction == 0.5
    assert report.net_saving == pytest.approx((skipped_layer - gates_layer) / dense_layer)
    assert report.head_flops == 4 * 2 * 64 * 101


def test_forward_records_tokens_and_context_without_padding():
    model = add_gates(tiny_model("llama"))
    ids, mask = padded_batch([4, 3], 4, side="left")
    stats = SkipStats()
    with torch.no_grad():
        model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=0.5, stats=stats))
    assert stats.tokens == 7
    assert stats.context == (1 + 2 + 3 + 4) + (1 + 2 + 3)


def test_gates_alone_cost_flops_at_budget_zero():
    model = add_gates(tiny_model("llama"))
    stats = SkipStats()
    with torch.no_grad():
        model(*padded_batch([6], 6), skip_plan=SkipPlan(budget=0.0, stats=stats))
    report = flop_report(stats, ModelDims.from_config(model.config), model.gate_bank.config)
    assert report.paper_fraction == 0.0
    assert report.net_saving < 0  # honest: vector gates add work and save none
