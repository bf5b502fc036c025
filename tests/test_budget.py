import math

import pytest
import torch

from gateskip.core.budget import QuantileBudget, ThresholdBudget, as_budget
from gateskip.errors import GateSkipError


def test_quantile_skips_the_least_important_tokens_of_each_sequence():
    imp = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    keep = QuantileBudget(0.5).keep(imp, valid, None, "attn.0")
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_quantile_skip_count_is_floor_of_ratio_times_valid_tokens(ratio):
    imp = torch.rand(3, 17)
    valid = torch.ones(3, 17, dtype=torch.bool)
    valid[1, 10:] = False  # padding: never kept, never counted
    keep = QuantileBudget(ratio).keep(imp, valid, None, "mlp.1")
    for row in range(3):
        n = int(valid[row].sum())
        assert int((valid[row] & ~keep[row]).sum()) == math.floor(ratio * n + 1e-9)
    assert not keep[~valid].any()


def test_batch_scope_pools_tokens_across_sequences():
    imp = torch.tensor([[0.1, 0.2], [0.8, 0.9]])
    valid = torch.ones(2, 2, dtype=torch.bool)
    keep = QuantileBudget(0.5, scope="batch").keep(imp, valid, None, "attn.0")
    assert keep.tolist() == [[False, False], [True, True]]


def test_protected_tokens_are_never_skipped():
    imp = torch.tensor([[0.0, 0.5, 0.6, 0.7]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    protect = torch.tensor([[True, False, False, False]])
    keep = QuantileBudget(0.25).keep(imp, valid, protect, "attn.0")
    assert keep.tolist() == [[True, False, True, True]]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_kept_counts_known_ahead_match_what_keep_yields(ratio):
    """Physical execution sizes its buffers from kept_counts before any importance exists."""
    torch.manual_seed(0)
    valid = torch.ones(4, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    valid[2, 1:] = False  # a one-token sequence
    valid[3] = False  # all padding
    protect = torch.zeros_like(valid)
    protect[0, 0] = protect[1, 3] = protect[2, 0] = True
    for prot in (None, protect):
        keep = QuantileBudget(ratio).keep(torch.rand(4, 9), valid, prot, "attn.0")
        protected = [0] * 4 if prot is None else (valid & prot).sum(1).tolist()
        assert QuantileBudget(ratio).kept_counts(valid.sum(1).tolist(), protected) == keep.sum(1).tolist()
    assert not QuantileBudget(0.5, scope="batch").known_ahead and QuantileBudget(0.5).known_ahead


def test_threshold_skips_below_the_module_threshold():
    imp = torch.tensor([[0.1, 0.5, 0.9]])
    valid = torch.tensor([[True, True, False]])
    keep = ThresholdBudget({"attn.0": 0.5}).keep(imp, valid, None, "attn.0")
    assert keep.tolist() == [[False, True, False]]


def test_threshold_without_calibration_for_a_module_is_a_clear_error():
    with pytest.raises(GateSkipError, match="no calibrated threshold"):
        ThresholdBudget({}).keep(torch.rand(1, 2), torch.ones(1, 2, dtype=torch.bool), None, "mlp.3")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "half"])
def test_bad_ratios_are_rejected(bad):
    with pytest.raises(GateSkipError, match="budget"):
        as_budget(bad)


def test_bad_scope_is_rejected():
    with pytest.raises(GateSkipError, match="scope"):
        QuantileBudget(0.5, scope="everything")


def test_budgets_say_which_modules_are_fixed_before_any_gate_runs():
    import math

    from gateskip import AllocationBudget, ThresholdBudget

    assert QuantileBudget(0.0).fixed("mlp.0") is True and QuantileBudget(1.0).fixed("mlp.0") is False
    assert QuantileBudget(0.3).fixed("mlp.0") is None
    t = ThresholdBudget({"mlp.0": -math.inf, "mlp.1": math.inf, "mlp.2": 0.5})
    assert [t.fixed(f"mlp.{i}") for i in range(4)] == [True, False, None, None]
    a = AllocationBudget({"mlp.1": 1.0, "mlp.2": 0.5}, 0.1)
    assert [a.fixed(f"mlp.{i}") for i in range(3)] == [True, False, None]
    assert a.kept_counts([10, 4], [0, 1], "mlp.2") == [5, 2] and a.known_ahead
    assert not AllocationBudget({}, 0.1, thresholds={}).known_ahead
