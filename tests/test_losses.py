"""Training losses: what each term counts, what it ignores, and which way it pulls the gates."""

import math

import pytest
import torch
import torch.nn.functional as F

from gateskip import GateConfig, SkipPlan, add_gates
from gateskip.errors import GateSkipError
from gateskip.data.textdata import IGNORE
from gateskip.training.losses import combine, distill_loss, lm_loss, mean_gate, sparsity_loss
from gateskip.core.plan import GateTrace

from conftest import padded_batch, tiny_model


def trace_of(*entries):
    return GateTrace(entries=[(f"m.{i}", g, valid) for i, (g, valid) in enumerate(entries)])


def test_lm_loss_is_shifted_cross_entropy_over_labelled_positions():
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[3, IGNORE, 5, 6]])
    expected = F.cross_entropy(logits[0, [1, 2]], torch.tensor([5, 6]))  # position 0 predicts an ignored label
    assert torch.allclose(lm_loss(logits, labels), expected)


def test_sparsity_l2_ignores_padding_and_averages_over_modules():
    valid = torch.tensor([[True, True, False]])
    g1 = torch.tensor([[[0.5, 0.5], [1.0, 1.0], [9.0, 9.0]]])  # padding value must not count
    g2 = torch.full((1, 3, 2), 0.2)
    loss = sparsity_loss(trace_of((g1, valid), (g2, valid)), "l2")
    assert math.isclose(float(loss), ((0.25 + 1.0) / 2 + 0.04) / 2, rel_tol=1e-6)
    assert math.isclose(float(sparsity_loss(trace_of((g1, valid)), "l1")), 0.75, rel_tol=1e-6)
    assert math.isclose(float(mean_gate(trace_of((g1, valid)))), 0.75, rel_tol=1e-6)


def test_bernoulli_kl_is_zero_at_the_target_and_grows_away_from_it():
    valid = torch.ones(1, 2, dtype=torch.bool)
    at = sparsity_loss(trace_of((torch.full((1, 2, 3), 0.3), valid)), "kl", target=0.3)
    away = sparsity_loss(trace_of((torch.full((1, 2, 3), 0.9), valid)), "kl", target=0.3)
    assert abs(float(at)) < 1e-5 and float(away) > 0.5


def test_unknown_sparsity_kind_is_a_clear_error():
    with pytest.raises(GateSkipError, match="unknown sparsity loss 'l3'"):
        sparsity_loss(trace_of((torch.ones(1, 1, 1), torch.ones(1, 1, dtype=torch.bool))), "l3")


def test_distill_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    assert float(distill_loss(logits, logits, labels)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(logits, torch.randn(2, 5, 11), labels)) > 0.01


def test_gradient_of_sparsity_reaches_gates_only():
    """The gates read a detached input, so the sparsity term never pulls on the backbone."""
    model = add_gates(tiny_model(), GateConfig(kind="lowrank", rank=4))
    ids, mask = padded_batch([6, 4], width=6)
    trace = GateTrace()
    out = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=0.25, execution="masked", trace=trace))
    labels = ids.masked_fill(mask == 0, IGNORE)
    terms = combine(out.logits, labels, trace, sparsity_weight=1.0)
    assert len(trace.entries) == 2 * model.config.num_hidden_layers
    terms.sparsity.backward()
    gate_grads = [p.grad for p in model.gate_bank.parameters()]
    backbone_grads = [p.grad for n, p in model.named_parameters() if "gate_bank" not in n]
    assert all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    assert all(g is None or g.abs().sum() == 0 for g in backbone_grads)
    logged = terms.detached()
    assert logged["total"] == pytest.approx(logged["lm"] + logged["sparsity"], rel=1e-6)
