"""The influence objective: unit gates regress each branch's measured influence, forward only."""

import torch

from conftest import tiny_model
from gateskip import GateConfig, add_gates
from gateskip.influence import branch_influence, influence_loss, percentiles


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
