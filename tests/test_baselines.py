"""Baselines: each runs through the gated forward and skips what it was asked to."""

import argparse
import copy
import json
import math

import pytest
import torch

from conftest import padded_batch, tiny_model
from gateskip import GateConfig, GateSkipError, ModelDims, SkipStats, add_gates, flop_report
from gateskip.search import baselines
from gateskip.search.baselines import RandomBudget, identity_bank, make_method, remove_layers
from gateskip.search.saturation import block_influence, least_influential
from gateskip.loading import load_model
from test_eval_harness import char_tokenizer


def gated(seed=0):
    return add_gates(tiny_model(seed=seed), GateConfig(kind="vector"))


def run(model, method, budget, ids, mask):
    stats = SkipStats()
    plan, _, _ = method.plans(budget, stats)
    with method.attached(model), torch.no_grad():
        logits = model(ids, attention_mask=mask, skip_plan=plan).logits
    return logits, flop_report(stats, ModelDims.from_config(model.config), None)


def test_identity_gates_change_nothing():
    model = gated()
    ids, mask = padded_batch([12, 9], 12)
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    logits, report = run(model, make_method("random", model), 0.0, ids, mask)
    assert torch.equal(logits * mask[..., None], reference * mask[..., None])
    assert report.paper_fraction == 0.0


@pytest.mark.parametrize("name, tolerance", [("random", 0.02), ("shortgpt", 0.02), ("calm", 0.1)])
@pytest.mark.parametrize("budget", [1 / 3, 2 / 3])
def test_baseline_skips_the_fraction_asked_for(name, tolerance, budget):
    model = gated()
    ids, mask = padded_batch([30, 30], 30)
    method = make_method(name, model, sample=(ids, mask))
    _, report = run(model, method, budget, ids, mask)
    # random: 1/3 of 30 tokens; shortgpt: 1 of 3 layers; calm: its threshold is set on a dense
    # forward, and exits then change the later states a little
    assert report.paper_fraction == pytest.approx(budget, abs=tolerance)
    assert report.net_saving > 0


def test_base_skips_nothing_and_applies_no_gates():
    model = gated()
    ids, mask = padded_batch([10], 10)
    with torch.no_grad():
        reference = model(ids).logits
    logits, report = run(model, make_method("base", model), 0.5, ids, mask)
    assert torch.equal(logits, reference) and report.paper_fraction == 0.0


def test_shortgpt_removes_the_least_influential_layers_first():
    model = gated()
    ids, mask = padded_batch([20, 20], 20)
    scores = block_influence(model, ids, mask)
    method = make_method("shortgpt", model, sample=(ids, mask))
    assert method.layer_order == sorted(range(3), key=lambda i: scores[i])
    plan, _, note = method.plans(1 / 3, SkipStats())
    removed = method.layer_order[0]
    assert plan.budget.thresholds[f"mlp.{removed}"] == math.inf and note == "1 layers removed"
    assert all(v == -math.inf for k, v in plan.budget.thresholds.items() if int(k.split(".")[1]) != removed)


def test_random_budget_is_seeded():
    imp = torch.zeros(2, 16)
    valid = torch.ones(2, 16, dtype=torch.bool)
    a = RandomBudget(0.5, seed=3).keep(imp, valid, None, "attn.0")
    b = RandomBudget(0.5, seed=3).keep(imp, valid, None, "attn.0")
    c = RandomBudget(0.5, seed=4).keep(imp, valid, None, "attn.0")
    assert torch.equal(a, b) and not torch.equal(a, c) and int((~a).sum()) == 16


def test_methods_that_need_gates_say_so_and_unknown_methods_fail():
    model = tiny_model()
    with pytest.raises(GateSkipError, match="needs gates"):
        make_method("gateskip", model)
    with pytest.raises(GateSkipError, match="unknown method 'moe'"):
        make_method("moe", gated())
    with pytest.raises(GateSkipError, match="method mod needs a router"):
        make_method("mod", gated())


def test_identity_bank_is_exactly_one():
    bank = identity_bank(gated())
    x = torch.randn(2, 5, 64) * 100
    assert torch.equal(bank.get("attn", 0)(x), torch.ones(2, 5, 1))


def test_pruning_equals_skipping_the_same_layers():
    """ShortGPT as a skip plan (every token skips both branches) and real layer removal agree."""
    pruned = tiny_model()
    skipping = add_gates(copy.deepcopy(pruned))
    ids, mask = padded_batch([14, 14], 14)
    method = make_method("shortgpt", skipping, sample=(ids, mask))
    skipped, report = run(skipping, method, 1 / 3, ids, mask)
    removed = least_influential(pruned, (ids, mask), 1)
    assert removed == method.layer_order[:1]
    remove_layers(pruned, removed)
    assert pruned.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in pruned.model.layers] == [0, 1]
    with torch.no_grad():
        assert torch.allclose(pruned(ids, attention_mask=mask).logits, skipped, atol=1e-5)
    assert report.paper_fraction == pytest.approx(1 / 3)


def test_remove_layers_refuses_bad_requests():
    with pytest.raises(GateSkipError, match="before adding gates"):
        remove_layers(gated(), [0])
    with pytest.raises(GateSkipError, match="cannot remove layers"):
        remove_layers(tiny_model(), [0, 1, 2])


def test_prune_command_saves_a_loadable_shallower_model(tmp_path):
    source = tmp_path / "tiny"
    tiny_model().save_pretrained(source)
    char_tokenizer().save_pretrained(source)
    text = tmp_path / "sample.txt"
    text.write_text("the sky is blue.\n\none plus one is two.\n")
    parser = argparse.ArgumentParser()
    baselines.register(parser.add_subparsers())
    out = tmp_path / "pruned"
    args = parser.parse_args(["prune", str(source), "--ratio", "0.34", "--out", str(out), "--sample-text", str(text)])
    assert baselines.run(args) == 0
    model, _ = load_model(str(out))
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert len(json.loads((out / "gateskip-pruned.json").read_text())["removed_layers"]) == 1
    with pytest.raises(GateSkipError, match="--ratio must be in"):
        baselines.run(parser.parse_args(["prune", str(source), "--ratio", "1.0", "--out", str(out)]))


def test_calm_exits_for_good_and_decodes_with_exits():
    model = add_gates(tiny_model(), GateConfig(kind="vector"))
    ids, mask = padded_batch([24, 24], 24)
    method = make_method("calm", model, sample=(ids, mask))
    stats = SkipStats()
    plan, generate_plan, note = method.plans(0.5, stats)
    assert "decode steps too" in note
    with method.attached(model), torch.no_grad():
        model(ids, attention_mask=mask, skip_plan=plan)
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, skip_plan=generate_plan)
    skipped = [stats.modules()[f"{b}.{i}"].skipped for i in range(3) for b in ("attn", "mlp")]
    assert skipped == sorted(skipped) and skipped[-1] > 0  # an exited token skips every later module
    assert out.shape[1] == 24 + 4
    assert not method.watch._handles  # hooks are gone once the method is detached


def test_baselines_follow_the_gates_first_token_policy_except_shortgpt():
    model = add_gates(tiny_model(), GateConfig(kind="vector", skip_bos=False))
    ids, mask = padded_batch([20, 20], 20)
    for name in ("random", "calm"):
        assert make_method(name, model, sample=(ids, mask)).bank.config.skip_bos is False
    shortgpt = make_method("shortgpt", model, sample=(ids, mask))
    plan, _, _ = shortgpt.plans(1 / 3, SkipStats())
    assert plan.skip_bos is True


def test_a_method_gives_the_model_its_own_gates_back():
    from conftest import tiny_model
    from gateskip import add_gates
    from gateskip.search.baselines import Method, identity_bank

    model = add_gates(tiny_model())
    own = model.gate_bank
    with Method("random", identity_bank(model), charge_gates=False).attached(model):
        assert model.gate_bank is not own
    assert model.gate_bank is own
