"""Unit gates and allocations: one net-saving target split into per-module skip ratios."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import padded_batch, tiny_model
from test_model import logits, scramble_gates
from gateskip import AllocationBudget, GateConfig, GateSkipError, ModelDims, SkipPlan, SkipStats, add_gates, flop_report
from gateskip.inference.calibrate import allocation_budget
from gateskip.search.allocation import (choose, kl_to_base, layer_removal, module_costs, predicted_saving,
                                 refine, sample_costs, search, store)
from gateskip.search.saturation import least_influential
from gateskip.inference.calibrate import calibrate_allocation
from gateskip.core.model import load_gates, read_gate_file, save_gates
from gateskip.core.plan import GateTrace

UNIT = GateConfig(kind="lowrank", rank=8, application="unit")


def gated(family="llama", config=UNIT, seed=1):
    model = add_gates(tiny_model(family), config)
    scramble_gates(model, seed=seed)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("execution", ["masked", "physical"])
def test_unit_gates_at_budget_zero_are_bit_identical_to_the_base(family, execution):
    model = tiny_model(family)
    ids, mask = padded_batch([12, 7, 10], 12, side="left")
    reference = logits(model, ids, mask)
    add_gates(model, GateConfig(application="unit"))
    valid = mask.bool()
    for budget in (None, 0.0, AllocationBudget({}, 0.0), AllocationBudget({"attn.1": 0.0}, 0.0)):
        out = logits(model, ids, mask, SkipPlan(budget=budget, execution=execution))
        assert torch.equal(out[valid], reference[valid])


def test_soft_gates_at_budget_zero_change_the_output_unit_gates_do_not():
    ids, mask = padded_batch([9, 9], 9)
    reference = logits(tiny_model(), ids, mask)
    soft = gated(config=GateConfig(kind="lowrank", rank=8, application="soft"))
    assert not torch.allclose(logits(soft, ids, mask, SkipPlan(budget=0.0)), reference)
    assert torch.equal(logits(gated(), ids, mask, SkipPlan(budget=0.0)), reference)


def test_unit_gates_get_a_gradient_while_the_forward_stays_unscaled():
    model = gated()
    ids, mask = padded_batch([10, 10], 10)
    plan = SkipPlan(budget=0.3, execution="masked", trace=GateTrace())
    out = model(ids, attention_mask=mask, skip_plan=plan).logits
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, skip_plan=SkipPlan(budget=0.3, execution="masked")).logits
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    out.square().mean().backward()
    grads = [p.grad for p in model.gate_bank.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_fixed_modules_evaluate_no_gate_and_a_removed_module_runs_nothing():
    model = gated()
    ids, mask = padded_batch([10, 10], 10)
    ratios = {"attn.0": 1.0, "mlp.0": 0.0, "mlp.1": 1.0, "attn.2": 0.5}
    calls = []
    for name in ("self_attn", "mlp"):
        for i, layer in enumerate(model.model.layers):
            getattr(layer, name).register_forward_hook(lambda *a, n=f"{name}.{i}": calls.append(n))
    for name in ("attn", "mlp"):
        for i, gate in enumerate(model.gate_bank.gates[name]):
            gate.register_forward_hook(lambda *a, n=f"gate.{name}.{i}": calls.append(n))
    proj = model.model.layers[0].self_attn.k_proj
    proj.register_forward_hook(lambda *a: calls.append("k_proj.0"))
    stats = SkipStats()
    logits(model, ids, mask, SkipPlan(budget=AllocationBudget(ratios, 0.1), stats=stats))
    assert "self_attn.0" not in calls and "k_proj.0" not in calls and "mlp.1" not in calls
    assert "gate.attn.0" not in calls and "gate.mlp.0" not in calls and "gate.mlp.1" not in calls
    assert "gate.attn.2" in calls and "gate.attn.1" not in calls  # ratio 0 under unit gates: no gate
    counts = stats.modules()
    assert counts["attn.0"].skipped == counts["attn.0"].seen == 20 and counts["attn.0"].kv_skipped == 20
    assert counts["attn.2"].skipped == 10 and counts["attn.2"].gate_evaluations == 20
    assert counts["mlp.0"].gate_evaluations == 0 and counts["mlp.1"].gate_evaluations == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("lengths,side", [([11, 6, 9], "right"), ([11, 6, 9], "left")])
def test_masked_and_physical_agree_under_an_allocation(family, lengths, side):
    model = gated(family)
    ids, mask = padded_batch(lengths, 11, side=side)
    budget = AllocationBudget({"attn.0": 1.0, "mlp.0": 0.3, "attn.1": 0.6, "mlp.2": 1.0, "attn.2": 0.25}, 0.2)
    masked = logits(model, ids, mask, SkipPlan(budget=budget, execution="masked"))
    physical = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical"))
    valid = mask.bool()
    assert torch.allclose(masked[valid], physical[valid], atol=1e-4, rtol=0)


def search_text(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, (2, 48), generator=g), torch.ones(2, 48, dtype=torch.long)


@pytest.mark.parametrize("protect", [False, True])
@pytest.mark.parametrize("target", [0.1, 0.25, 0.4])
def test_an_allocation_meets_its_net_saving_target_within_one_point(target, protect):
    model = gated(config=GateConfig(kind="lowrank", rank=8, application="unit", skip_bos=not protect))
    sample = search_text()
    found = search(model, sample, [target], levels=(0.5, 1.0))
    ratios = found[f"{target:g}"]["ratios"]
    stats = SkipStats()
    ids, mask = search_text(seed=1)
    logits(model, ids, mask, SkipPlan(budget=AllocationBudget(ratios, target), stats=stats))
    report = flop_report(stats, ModelDims.from_config(model.config), model.gate_bank.config)
    assert report.net_saving == pytest.approx(target, abs=0.01)


def test_the_search_path_is_nested_and_kl_grows_with_the_target():
    model = gated()
    found = search(model, search_text(), [0.1, 0.2, 0.3], levels=(0.5, 1.0))
    kls = [found[t]["kl"] for t in ("0.1", "0.2", "0.3")]
    assert kls == sorted(kls) and kls[0] > 0
    removed = [{k for k, r in found[t]["ratios"].items() if r == 1.0} for t in ("0.1", "0.2", "0.3")]
    assert removed[0] <= removed[1] <= removed[2]


def test_layer_removal_removes_the_least_influential_whole_layers_within_the_target():
    model, sample = gated(), search_text()
    costs, dense = sample_costs(model, sample[1])
    order = least_influential(model, sample, 3)
    assert layer_removal(model, sample, 0.2) == {}  # one layer saves a third: beyond 0.2
    ratios = layer_removal(model, sample, 0.7)
    assert ratios == {f"{b}.{i}": 1.0 for i in order[:2] for b in ("attn", "mlp")}
    assert predicted_saving(ratios, costs, dense) <= 0.7


def test_refine_exchanges_a_costly_removal_and_meets_the_target():
    # In this tiny model attention is costly and the MLPs nearly free: layer removal's attention
    # should be given back and paid for with MLP tokens.
    model, sample = gated(), search_text()
    seed = layer_removal(model, sample, 0.4)
    topped = refine(model, sample, {"0.4": seed}, levels=(0.5, 1.0), rounds=0)["0.4"]
    assert seed.items() <= topped["ratios"].items() and topped["saving"] == pytest.approx(0.4)
    lines = []
    found = refine(model, sample, {"0.4": seed}, levels=(0.5, 1.0), rounds=4, progress=lines.append)["0.4"]
    assert found["kl"] < topped["kl"] and found["saving"] == pytest.approx(0.4)
    assert found["ratios"].get(next(k for k in seed if k.startswith("attn.")), 0.0) < 1.0
    assert len(lines) == 1 and "exchanges" in lines[0]
    ids, mask = sample
    with torch.no_grad():
        base = torch.log_softmax(logits(model, ids, mask, SkipPlan(apply_gates=False)).float(), -1)
    assert found["kl"] == pytest.approx(kl_to_base(model, ids, mask, base, AllocationBudget(found["ratios"], 0.0)))
    stats = SkipStats()
    logits(model, *search_text(seed=1), SkipPlan(budget=AllocationBudget(found["ratios"], 0.4), stats=stats))
    report = flop_report(stats, ModelDims.from_config(model.config), model.gate_bank.config)
    assert report.net_saving == pytest.approx(0.4, abs=0.01)


def test_refine_can_raise_again_a_module_the_seed_removed(monkeypatch):
    # A give-back of a seed-removed module is measured, so the greedy top-up after it may take
    # that module back up (it is ranked like every other move).
    import gateskip.search.allocation as allocation

    model, sample = gated(), search_text()
    seed = layer_removal(model, sample, 0.4)
    offered, climb = [], allocation._climb

    def recording(meter, ratios, kl, targets, levels, heap, *args, **kwargs):
        offered.append({key for k, r in seed.items() if ratios.get(k, 0.0) < r
                        for _, _, key, _, _ in heap if key == k})
        return climb(meter, ratios, kl, targets, levels, heap, *args, **kwargs)

    monkeypatch.setattr(allocation, "_climb", recording)
    refine(model, sample, {"0.4": seed}, levels=(0.5, 1.0), rounds=2)
    assert any(offered[1:])  # the first call is the top-up; later ones follow a give-back


def test_choose_keeps_the_lowest_kl_candidate_that_reaches_the_target():
    model = gated()
    searched = search(model, search_text(), [0.1, 0.2], levels=(0.5, 1.0))
    more = {"0.1": searched["0.2"]}  # reaches 0.1 (it saves 0.2), at a higher KL
    less = {"0.2": searched["0.1"]}  # a lower KL, but it saves only 0.1: not eligible for 0.2
    held_back = search_text(seed=3)
    lines = []
    chosen = choose(model, {"more": more, "first": searched, "less": less}, held_back, ["0.1", "0.2"], progress=lines.append)
    assert len(lines) == 4 and sum("short of the target" in line for line in lines) == 1
    assert [chosen[t]["chosen_from"] for t in ("0.1", "0.2")] == ["first", "first"]
    assert chosen["0.2"]["ratios"] == searched["0.2"]["ratios"]
    assert chosen["0.2"]["measured_saving"] == pytest.approx(0.2, abs=0.01)
    ids, mask = held_back
    with torch.no_grad():
        base = torch.log_softmax(logits(model, ids, mask, SkipPlan(apply_gates=False)).float(), -1)
    assert chosen["0.1"]["kl"] == pytest.approx(kl_to_base(model, ids, mask, base, AllocationBudget(searched["0.1"]["ratios"], 0.0)))
    assert choose(model, {"more": more, "first": searched}, held_back, ["0.1"])["0.1"]["chosen_from"] == "first"
    # Nothing reaches the target: the candidate that saves most is kept.
    assert choose(model, {"less": less}, held_back, ["0.2"])["0.2"]["chosen_from"] == "less"
    with pytest.raises(GateSkipError, match="no candidate holds an allocation for 0.3"):
        choose(model, {"first": searched}, held_back, ["0.3"])


def test_predicted_saving_charges_gates_only_for_partly_skipped_modules():
    model = gated()
    costs, dense = module_costs(model.gate_bank, ModelDims.from_config(model.config), context=10.0, length=20.0)
    whole = predicted_saving({"mlp.0": 1.0}, costs, dense)
    half = predicted_saving({"mlp.0": 0.5}, costs, dense)
    assert half == pytest.approx(whole / 2 - costs["mlp.0"].gate / dense)


def test_a_target_beyond_the_model_is_a_clear_error():
    mlp_only = gated(config=GateConfig(kind="lowrank", rank=8, application="unit", branches=("mlp",)))
    with pytest.raises(GateSkipError, match="beyond what this model allows"):
        search(mlp_only, search_text(), [0.95])
    with pytest.raises(GateSkipError, match="budget must be a skip ratio"):
        search(gated(), search_text(), [1.5])


def test_allocations_save_load_and_drive_decoding_thresholds(tmp_path):
    model = gated()
    sample = search_text()
    store(model.gate_bank, search(model, sample, [0.2], levels=(0.5, 1.0)))
    calibrate_allocation(model, sample, model.gate_bank.allocations)
    save_gates(model, tmp_path)
    fresh = load_gates(add_gates(tiny_model()), tmp_path)
    assert fresh.gate_bank.allocations == model.gate_bank.allocations
    decode = allocation_budget(fresh, 0.2, decoding=True)
    ratios = decode.ratios
    assert set(decode.thresholds) == {k for k, r in ratios.items() if 0 < r < 1}
    # Replayed on the calibration text, thresholds skip each partly skipped module's share.
    stats = SkipStats()
    logits(fresh, *sample, SkipPlan(budget=decode, stats=stats))
    for key, c in stats.modules().items():
        assert c.skipped / c.seen == pytest.approx(ratios.get(key, 0.0), abs=1.5 / c.seen)


def test_a_missing_allocation_and_one_for_another_model_are_clear_errors(tmp_path):
    model = gated()
    with pytest.raises(GateSkipError, match="no allocation stored for a net saving of 0.15"):
        allocation_budget(model, 0.15)
    model.gate_bank.allocations = {"0.1": {"ratios": {"mlp.7": 1.0}, "saving": 0.1, "kl": 0.0}}
    with pytest.raises(GateSkipError, match="mlp.7, which these gates do not have"):
        save_gates(model, tmp_path)  # never written: the loader would refuse it
    model.gate_bank.allocations = {}
    save_gates(model, tmp_path)
    meta, tensors = read_gate_file(tmp_path)  # the same allocation in a file made elsewhere
    meta["allocations"] = {"0.1": {"ratios": {"mlp.7": 1.0}, "saving": 0.1, "kl": 0.0}}
    save_file(tensors, str(tmp_path / "gateskip.safetensors"), metadata={"gateskip": json.dumps(meta)})
    with pytest.raises(GateSkipError, match="mlp.7, which these gates do not have"):
        load_gates(add_gates(tiny_model()), tmp_path)


def test_allocation_budget_validates_ratios():
    with pytest.raises(GateSkipError):
        AllocationBudget({"mlp.0": 1.5}, 0.1)
    assert AllocationBudget({"mlp.0": 1.0}, 0.1).fixed("mlp.0") is False
    assert AllocationBudget({"mlp.0": 1.0}, 0.1).fixed("attn.0") is True
    assert math.isclose(AllocationBudget({"mlp.0": 0.4}, 0.1).ratio("mlp.0"), 0.4)


def test_cpu_has_bf16_reads_the_cpu_capabilities(monkeypatch):
    from gateskip.search.allocation import cpu_has_bf16

    for caps, native in (({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({"avx2": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert cpu_has_bf16() is native
