"""The local objectives: unit gates regress each branch's measured influence (forward only)
or its attribution (first-order loss change of removing it, one forward and backward)."""

import pytest
import torch

from conftest import tiny_model
from gateskip import GateConfig, add_gates
from gateskip.training.influence import branch_attribution, branch_influence, influence_loss, percentiles


def search_text(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (2, 48), generator=g), torch.ones(2, 48, dtype=torch.long)


def test_influence_objective_trains_gates_to_rank_tokens_by_branch_influence():
    model = add_gates(tiny_model("gemma3"), GateConfig(kind="lowrank", rank=8, application="unit"))
    ids, mask = search_text()
    found = branch_influence(model, ids, mask)
    assert set(found) == set(model.gate_bank.module_keys())
    x, infl = found["mlp.1"]
    assert x.shape == (2, 48, 64) and infl.shape == (2, 48) and (infl > 0).all()
    pct = percentiles(torch.tensor([[3.0, 1.0, 2.0, 9.0]]), torch.tensor([[True, True, True, False]]))
    assert pct.tolist() == [[1.0, 0.0, 0.5, 0.0]]
    opt = torch.optim.Adam(model.gate_bank.parameters(), lr=3e-2)
    first = float(influence_loss(model, ids, mask).detach())
    for _ in range(40):
        opt.zero_grad()
        influence_loss(model, ids, mask).backward()
        opt.step()
    assert float(influence_loss(model, ids, mask).detach()) < 0.5 * first


def _lm_loss_with_one_output_scaled(model, ids, mask, branch: str, layer: int, token: int, scale: float) -> float:
    """The base model's LM loss with one token's output of one branch multiplied by `scale`."""
    from gateskip.training.influence import _output_module
    from gateskip.core.layer import branch_norms

    block = model.model.layers[layer]
    module = _output_module(block, branch, branch_norms(block)[branch][1])

    def hook(mod, args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, token] *= scale
        return (out, *output[1:]) if isinstance(output, tuple) else out

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten()))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attribution_is_the_first_order_loss_change_of_removing_a_branch_output(family):
    model = add_gates(tiny_model(family).double(), GateConfig(kind="lowrank", rank=8, application="unit"))
    ids, mask = search_text()
    found = branch_attribution(model, ids, mask)
    assert set(found) == set(model.gate_bank.module_keys())
    for key, token in (("attn.1", 5), ("mlp.2", 17)):
        branch, layer = key.split(".")
        eps = 1e-2  # the logits are float32: a smaller step drowns in round-off
        up, down = (_lm_loss_with_one_output_scaled(model, ids, mask, branch, int(layer), token, 1 + s) for s in (eps, -eps))
        derivative = (up - down) / (2 * eps)  # dL/dz summed over the batch's sequences at that position
        assert found[key][1][:, token].sum().item() == pytest.approx(-derivative, rel=2e-3)
    x, attribution = found["mlp.1"]
    assert x.shape == (2, 48, 64) and not x.requires_grad and not attribution.requires_grad
    loss = influence_loss(model, ids, mask, target="attribution")
    loss.backward()
    assert all(p.grad is not None for p in model.gate_bank.parameters())
