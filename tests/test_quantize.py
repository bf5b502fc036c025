"""Weight-only quantisation of the backbone with skipping on top; the gates stay full precision."""

import pytest
import torch

from conftest import padded_batch, tiny_model
from gateskip import GateConfig, GateSkipError, SkipPlan, SkipStats, add_gates
from gateskip.evaluation.quantize import quantize_weights


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantised_gated_model_runs_with_skipping(scheme):
    model = add_gates(tiny_model(), GateConfig(kind="vector"))
    ids, mask = padded_batch([16, 11], 16)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
        quantize_weights(model, scheme)
        plain = model(ids, attention_mask=mask).logits
        stats = SkipStats()
        skipped = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=0.5, stats=stats)).logits
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"  # a torchao tensor
    assert type(model.gate_bank.get("attn", 0).proj.weight) is torch.nn.Parameter
    assert model.gate_bank.get("attn", 0).proj.weight.dtype == torch.float32
    assert torch.isfinite(skipped).all()
    error = (plain - reference).abs().max().item()
    assert 0 < error < (0.05 if scheme == "int8" else 0.5)
    assert stats.skip_fraction("mlp.0") == pytest.approx(0.5, abs=0.1)


def test_unknown_scheme_is_rejected():
    with pytest.raises(GateSkipError, match="unknown quantisation 'fp3'"):
        quantize_weights(tiny_model(), "fp3")
