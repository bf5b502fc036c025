import torch

from gateskip.core.plan import unit_factor


def test_unit_factor_is_exactly_one_and_gives_the_gate_the_gradient_of_scaling():
    g = torch.tensor([[[0.2, 0.4], [0.9, 0.7]]], requires_grad=True)  # (B, T, d): importance 0.3, 0.8
    factor = unit_factor(g)
    assert torch.equal(factor, torch.ones(1, 2, 1))
    factor.sum().backward()
    # d/dg of imp / imp.detach() with imp = mean(g): 1 / (d * imp)
    assert torch.allclose(g.grad, torch.tensor([[[1 / 0.6] * 2, [1 / 1.6] * 2]]))


def test_unit_factor_stays_finite_where_a_gate_underflowed_to_zero():
    g = torch.zeros(1, 2, 4)
    g[0, 1] = 0.5
    g.requires_grad_(True)
    factor = unit_factor(g)  # imp / imp.detach() would be 0 / 0 at the first token
    assert torch.equal(factor, torch.ones(1, 2, 1))
    factor.sum().backward()
    assert torch.isfinite(g.grad).all()


def test_unit_factor_is_none_without_a_gradient():
    assert unit_factor(torch.rand(1, 2, 4)) is None
