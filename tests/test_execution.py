"""Physical execution's kernels agree with masked execution: FlexAttention for kept queries
(block mask from the kept positions or from the model's mask) at several budgets, paddings
and a sliding window; kept positions found with one top-k are the ones a stable sort finds."""

import pytest
import torch

from conftest import padded_batch, tiny_model
from gateskip import GateConfig, SkipPlan, add_gates
from gateskip.core.tokens import pack_per_sequence
from test_model import logits, scramble_gates

torch.set_num_threads(1)


def test_kept_positions_from_one_top_k_are_those_of_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for t in (1, 7, 64):
        keep = torch.rand(5, t, generator=g) < 0.6
        keep[0] = False  # a row that keeps nothing
        counts = keep.sum(1)
        for capacity in (None, int(counts.max()), t):
            index, slot_valid = pack_per_sequence(keep, capacity)
            k = index.shape[1]
            order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
            expected_valid = torch.arange(k)[None, :] < counts[:, None]
            assert torch.equal(slot_valid, expected_valid)
            assert torch.equal(index, order.masked_fill(~expected_valid, 0))


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention on a CPU warns that it is unfused
@pytest.mark.parametrize("family,lengths,side", [
    ("llama", [11, 11], None),         # no padding: the block mask from the kept positions alone
    ("llama", [11, 6, 9], "left"),     # padding: from the model's mask
    ("qwen2", [4, 11], "right"),
    ("gemma3", [14, 9], "left"),       # past the sliding window
])
def test_flex_attention_for_kept_queries_equals_masked_execution(family, lengths, side):
    model = add_gates(tiny_model(family), GateConfig(kind="lowrank", rank=8))
    scramble_gates(model)
    ids, mask = padded_batch(lengths, max(lengths), side=side or "right")
    mask = None if side is None else mask
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    for budget in (0.25, 0.5, 0.9):
        masked = logits(model, ids, mask, SkipPlan(budget=budget, execution="masked"))
        flex = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical", attention="flex"))
        sdpa = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical", attention="sdpa"))
        assert torch.allclose(masked[valid], flex[valid], atol=1e-4, rtol=0), budget
        assert torch.allclose(sdpa[valid], flex[valid], atol=1e-4, rtol=0), budget
