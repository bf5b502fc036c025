import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import T5Config, T5ForConditionalGeneration

from conftest import padded_batch, tiny_model
from gateskip import GateConfig, GateSkipError, SkipPlan, SkipStats, add_gates, load_gates, remove_gates, save_gates
from gateskip.core.model import is_gated, read_gate_file


def scramble_gates(model, std=0.3, seed=1):
    """Trained-looking gates: values spread over (0, 1), so skipping and scaling both matter."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, std)


def logits(model, ids, mask, plan=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask, skip_plan=plan).logits


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("execution", ["masked", "physical"])
def test_gates_not_applied_at_budget_zero_are_bit_identical_to_the_original(family, execution):
    model = tiny_model(family)
    ids, mask = padded_batch([12, 7, 10], 12, side="left")
    reference = logits(model, ids, mask)
    add_gates(model)
    scramble_gates(model)
    valid = mask.bool()
    for plan in (None, SkipPlan(apply_gates=False, execution=execution)):
        assert torch.equal(logits(model, ids, mask, plan)[valid], reference[valid])


def test_open_gates_change_the_output_and_removing_them_restores_it():
    model = tiny_model("llama")
    ids, mask = padded_batch([9, 9], 9)
    reference = logits(model, ids, mask)
    add_gates(model)
    scramble_gates(model)
    assert not torch.allclose(logits(model, ids, mask, SkipPlan()), reference)
    remove_gates(model)
    assert torch.equal(logits(model, ids, mask), reference)


@pytest.mark.parametrize("kind", ["vector", "scalar", "lowrank"])
@pytest.mark.parametrize("budget", [0.0, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("lengths,side", [([11], "right"), ([11, 6, 9], "right"), ([11, 6, 9], "left"), ([4, 11], "left")])
def test_masked_and_physical_execution_agree(llama_family, kind, budget, lengths, side):
    model = add_gates(tiny_model(llama_family), GateConfig(kind=kind, rank=8))
    scramble_gates(model)
    ids, mask = padded_batch(lengths, 11, side=side)
    masked = logits(model, ids, mask, SkipPlan(budget=budget, execution="masked"))
    physical = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical"))
    valid = mask.bool()
    assert torch.allclose(masked[valid], physical[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("budget", [0.25, 0.5])
def test_masked_and_physical_agree_on_gemma3(budget):
    model = add_gates(tiny_model("gemma3"), GateConfig(kind="lowrank", rank=8))
    scramble_gates(model)
    ids, mask = padded_batch([14, 9], 14, side="left")  # longer than the sliding window
    masked = logits(model, ids, mask, SkipPlan(budget=budget, execution="masked"))
    physical = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical"))
    assert torch.allclose(masked[mask.bool()], physical[mask.bool()], atol=1e-4, rtol=0)


@pytest.mark.parametrize("execution", ["masked", "physical"])
def test_a_sequence_gives_the_same_logits_alone_and_inside_a_padded_batch(execution):
    model = add_gates(tiny_model("llama"))
    scramble_gates(model)
    ids, mask = padded_batch([7, 12, 10], 12, side="left")
    plan = SkipPlan(budget=0.4, execution=execution)
    batched = logits(model, ids, mask, plan)
    alone = logits(model, ids[:1, -7:], mask[:1, -7:], plan)
    assert torch.allclose(batched[0, -7:], alone[0], atol=1e-5)


def test_batch_scope_makes_a_sequence_depend_on_its_batch_mates():
    model = add_gates(tiny_model("llama"))
    scramble_gates(model)
    ids, mask = padded_batch([12, 12], 12)
    ids[1] = ids[1] % 7  # a different second sequence
    from gateskip import QuantileBudget

    plan = SkipPlan(budget=QuantileBudget(0.5, scope="batch"), execution="physical")
    batched = logits(model, ids, mask, plan)
    alone = logits(model, ids[:1], mask[:1], plan)
    assert not torch.allclose(batched[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 0.75])
def test_measured_skip_fraction_per_module_is_the_budget(budget):
    model = add_gates(tiny_model("llama"))
    scramble_gates(model)
    ids, mask = padded_batch([40, 33], 40)
    stats = SkipStats()
    logits(model, ids, mask, SkipPlan(budget=budget, stats=stats))
    counts = stats.modules()
    assert set(counts) == set(model.gate_bank.module_keys())
    for c in counts.values():
        assert c.seen == 73  # padding is never counted
        assert c.skipped == int(budget * 40 + 1e-9) + int(budget * 33 + 1e-9)


def test_bos_is_protected_when_asked():
    model = add_gates(tiny_model("llama"))
    scramble_gates(model)
    ids, mask = padded_batch([2, 2], 2, side="left")
    stats = SkipStats()
    logits(model, ids, mask, SkipPlan(budget=1.0, skip_bos=False, stats=stats))
    assert all(c.skipped == 2 for c in stats.modules().values())  # one of two tokens per row


def test_ungated_branches_are_never_skipped():
    model = add_gates(tiny_model("llama"), GateConfig(branches=("attn",)))
    stats = SkipStats()
    logits(model, *padded_batch([8], 8), SkipPlan(budget=0.5, stats=stats))
    assert set(stats.modules()) == {"attn.0", "attn.1", "attn.2"}


def test_shared_gates_have_one_gate_per_branch():
    model = add_gates(tiny_model("llama"), GateConfig(shared=True))
    assert len(model.gate_bank.gates["attn"]) == 1
    assert model.gate_bank.get("mlp", 0) is model.gate_bank.get("mlp", 2)


def test_original_module_names_and_weights_are_kept():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    add_gates(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(k in before or k.startswith("gate_bank.") for k in after)
    assert type(model).__name__ == "LlamaForCausalLM"  # what save_pretrained writes as the architecture


def test_generate_runs_with_a_skip_plan():
    model = add_gates(tiny_model("llama"))
    ids, mask = padded_batch([5, 3], 5, side="left")
    stats = SkipStats()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         skip_plan=SkipPlan(budget=0.5, stats=stats))
    assert out.shape == (2, 9)
    assert stats.forwards == 4


@pytest.mark.parametrize("kind", ["vector", "scalar", "lowrank"])
def test_save_then_load_gives_identical_logits(tmp_path, kind):
    model = add_gates(tiny_model("llama"), GateConfig(kind=kind, rank=4))
    scramble_gates(model)
    model.gate_bank.thresholds = {"0.5": {"attn.0": 0.3}}
    ids, mask = padded_batch([10, 6], 10)
    plan = SkipPlan(budget=0.3)
    expected = logits(model, ids, mask, plan)
    path = save_gates(model, tmp_path)
    assert path.name == "gateskip.safetensors"

    fresh = load_gates(tiny_model("llama"), tmp_path)
    assert fresh.gate_bank.config.kind == kind
    assert fresh.gate_bank.thresholds == {"0.5": {"attn.0": 0.3}}
    assert torch.equal(logits(fresh, ids, mask, plan), expected)


def test_a_gate_file_for_another_model_is_a_clear_error(tmp_path):
    save_gates(add_gates(tiny_model("llama")), tmp_path)
    other = tiny_model("llama")
    other.model.layers = other.model.layers[:2]
    with pytest.raises(GateSkipError, match="made for 3 layers"):
        load_gates(other, tmp_path)
    with pytest.raises(GateSkipError, match="no gate file"):
        load_gates(tiny_model("llama"), tmp_path / "elsewhere")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GateSkipError, match="not a gateskip gate file"):
        load_gates(tiny_model("llama"), tmp_path / "junk.safetensors")


def rewrite_gate_file(path, **meta_changes):
    """A copy of a gate file with some metadata fields changed (None: the field removed)."""
    meta, tensors = read_gate_file(path)
    meta = {k: v for k, v in {**meta, **meta_changes}.items() if v is not None}
    save_file(tensors, str(path), metadata={"gateskip": json.dumps(meta)})


def test_gates_saved_from_another_architecture_are_refused(tmp_path):
    save_gates(add_gates(tiny_model("qwen2")), tmp_path)  # the same shapes as the tiny Llama
    with pytest.raises(GateSkipError, match=r"made for a qwen2 model, but this model is llama$"):
        load_gates(tiny_model("llama"), tmp_path)
    rewrite_gate_file(tmp_path / "gateskip.safetensors", model_type=None)  # files from before the field
    assert is_gated(load_gates(tiny_model("llama"), tmp_path))


def test_a_gate_file_that_does_not_fit_names_the_tensor_and_leaves_the_model_as_it_was(tmp_path):
    save_gates(add_gates(tiny_model("llama"), GateConfig(kind="lowrank", rank=8)), tmp_path)
    rewrite_gate_file(tmp_path / "gateskip.safetensors", gate_config=GateConfig(kind="lowrank", rank=4).to_dict())
    model = add_gates(tiny_model("llama"), GateConfig(kind="vector"))
    scramble_gates(model)
    ids, mask = padded_batch([6, 4], 6)
    plan = SkipPlan(budget=0.5)
    before, bank = logits(model, ids, mask, plan), model.gate_bank
    with pytest.raises(GateSkipError) as failure:
        load_gates(model, tmp_path)
    assert str(failure.value).endswith("does not fit this model: gates.attn.0.down.weight has shape (8, 64) "
                                       "in the file but (4, 64) in this model")
    assert model.gate_bank is bank and bank.config.kind == "vector"
    assert torch.equal(logits(model, ids, mask, plan), before)


@pytest.mark.parametrize(
    "make_config,match",
    [
        (lambda: GateConfig(kind="cubic"), "unknown gate kind"),
        (lambda: GateConfig(kind="lowrank", rank=0), "positive integer"),
        (lambda: GateConfig(branches=("ffn",)), "branches"),
    ],
)
def test_bad_gate_configs_are_clear_errors(make_config, match):
    with pytest.raises(GateSkipError, match=match):
        make_config()


def test_rank_wider_than_the_model_is_a_clear_error():
    with pytest.raises(GateSkipError, match="exceeds the model width"):
        add_gates(tiny_model("llama"), GateConfig(kind="lowrank", rank=65))


def test_unsupported_architectures_are_clear_errors():
    t5 = T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=50, d_kv=8))
    with pytest.raises(GateSkipError, match="unsupported architecture 't5'"):
        add_gates(t5)


def test_bad_plans_are_clear_errors():
    with pytest.raises(GateSkipError, match="execution"):
        SkipPlan(execution="sparse")
    with pytest.raises(GateSkipError, match="needs apply_gates"):
        SkipPlan(budget=0.5, apply_gates=False)
    with pytest.raises(GateSkipError, match="budget"):
        SkipPlan(budget=1.5)


def test_the_first_token_policy_travels_with_the_gates(tmp_path):
    model = add_gates(tiny_model("llama"), GateConfig(skip_bos=False))
    scramble_gates(model)
    ids, mask = padded_batch([2, 2], 2, side="left")
    save_gates(model, tmp_path)
    model = load_gates(tiny_model("llama"), tmp_path)
    stats = SkipStats()
    logits(model, ids, mask, SkipPlan(budget=1.0, stats=stats))
    assert all(c.skipped == 2 for c in stats.modules().values())  # the gates protect the first token
    stats = SkipStats()
    logits(model, ids, mask, SkipPlan(budget=1.0, skip_bos=True, stats=stats))
    assert all(c.skipped == 4 for c in stats.modules().values())  # unless the plan says otherwise


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_and_physical_agree_on_long_padded_sequences(family, side):
    model = add_gates(tiny_model(family), GateConfig(kind="lowrank", rank=8))
    scramble_gates(model)
    ids, mask = padded_batch([300, 170], 300, side=side)
    for budget in (0.25, 0.5):
        masked = logits(model, ids, mask, SkipPlan(budget=budget, execution="masked"))
        physical = logits(model, ids, mask, SkipPlan(budget=budget, execution="physical"))
        assert torch.allclose(masked[mask.bool()], physical[mask.bool()], atol=1e-4, rtol=0)
