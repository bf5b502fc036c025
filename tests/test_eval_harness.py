"""The lm-eval model wrapper: lm-eval's requests really run through the gated model's skip plan."""

import pytest
import torch
from lm_eval.api.instance import Instance
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_model
from gateskip import GateConfig, ModelDims, SkipPlan, SkipStats, add_gates, flop_report
from gateskip.evaluation.harness import GatedLM

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?:+-=\n"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (48 ids), small enough for the tiny models' vocabulary."""
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")


def gated_tiny(seed: int = 0):
    """A tiny model with spread-out gates, so that both scaling and skipping matter."""
    model = add_gates(tiny_model(seed=seed), GateConfig(kind="vector"))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    return model


def loglik_requests():
    pairs = [("the sky is", " blue"), ("one plus one is", " two"), ("a cat sat on the", " mat")]
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def logliks(lm, plan):
    lm.use(plan)
    return torch.tensor([ll for ll, _ in lm.loglikelihood(loglik_requests(), disable_tqdm=True)])


def test_without_a_plan_the_wrapper_is_plain_hflm():
    model = gated_tiny()
    lm = GatedLM(model, char_tokenizer())
    reference = logliks(lm, None)
    ungated = logliks(lm, SkipPlan(budget=None, apply_gates=False))
    assert torch.equal(reference, ungated)


def test_lm_eval_sees_the_gates_at_a_high_budget():
    model = gated_tiny()
    lm = GatedLM(model, char_tokenizer())
    base = logliks(lm, SkipPlan(budget=None, apply_gates=False))
    stats = SkipStats()
    skipped = logliks(lm, SkipPlan(budget=0.75, execution="physical", stats=stats))
    assert (skipped - base).abs().max() > 1e-3
    report = flop_report(stats, ModelDims.from_config(model.config), model.gate_bank.config)
    assert stats.tokens > 0
    assert report.paper_fraction == pytest.approx(0.75, abs=0.1)  # floor() per sequence of ~15 tokens


def test_generate_until_runs_under_the_plan():
    model = gated_tiny()
    lm = GatedLM(model, char_tokenizer())
    stats = SkipStats()
    lm.use(SkipPlan(budget=0.5, stats=stats))
    request = Instance("generate_until", doc={}, idx=0,
                       arguments=("one plus one is", {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}))
    (text,) = lm.generate_until([request], disable_tqdm=True)
    assert isinstance(text, str)
    assert stats.forwards >= 2  # the prefill and at least one decode step went through the plan
