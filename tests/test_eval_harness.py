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


def char_tokenizer(chars: str = CHARS, eos_first: bool = False) -> PreTrainedTokenizerFast:
    """One token per character (48 ids with CHARS), small enough for the tiny models' vocabulary;
    `eos_first` makes the end of text id 0 (<unk> 1)."""
    special = ["<eos>", "<unk>"] if eos_first else ["<unk>", "<eos>"]
    vocab = {**{t: i for i, t in enumerate(special)}, **{c: i + 2 for i, c in enumerate(chars)}}
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


# Requests of many lengths, some sharing a context (lm-eval scores those one-token
# continuations from one row), some with the unknown character "!" (token id 0, the value
# HFLM pads with): batches mix rows of different lengths, and zeros are not a padding mark.
MIXED = [("the sky is", " blue"), ("the sky is", " green"), ("one plus one is ", "2"), ("one plus one is ", "3"),
         ("a cat sat on the", " mat"), ("a", " b"), ("hey", "!!a"), ("wow! 12 + 30 = ", "42"),
         ("is water wet? the answer is", " yes, it is"), ("q: 7 - 2 = ?\na:", " 5")]
PASSAGES = ["the quick brown fox jumps over the lazy dog.", "one two three", "a b c d e f g h i j k l m n o p",
            "hello!", "to be or not to be, that is the question: whether tis nobler in the mind"]
PLANS = {
    "no plan": lambda stats: None,
    "gates, budget 0": lambda stats: SkipPlan(budget=None, stats=stats),
    "physical 0.25": lambda stats: SkipPlan(budget=0.25, execution="physical", stats=stats),
    "masked 0.5": lambda stats: SkipPlan(budget=0.5, execution="masked", stats=stats),
}


def score(model, batch_size: int | str, plan_name: str, rolling: bool = False):
    """(log-likelihoods, greedy flags, stats) of MIXED (or PASSAGES, rolling) at one batch size."""
    lm = GatedLM(model, char_tokenizer(), batch_size=batch_size, max_length=12 if rolling else None)
    stats = SkipStats()
    lm.use(PLANS[plan_name](stats))
    if rolling:
        requests = [Instance("loglikelihood_rolling", doc={}, arguments=(p,), idx=i) for i, p in enumerate(PASSAGES)]
        return torch.tensor(lm.loglikelihood_rolling(requests, disable_tqdm=True)), [], stats
    requests = [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(MIXED)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    return torch.tensor([ll for ll, _ in results]), [greedy for _, greedy in results], stats


def assert_same_counts(batched: SkipStats, single: SkipStats) -> None:
    assert batched.tokens == single.tokens
    assert batched.context == single.context
    assert batched.modules().keys() == single.modules().keys()
    for key, count in single.modules().items():
        assert (batched.modules()[key].seen, batched.modules()[key].skipped) == (count.seen, count.skipped), key


@pytest.mark.parametrize("plan_name", list(PLANS))
def test_batched_scoring_equals_batch_size_one(plan_name):
    model = gated_tiny()
    single, single_greedy, single_stats = score(model, 1, plan_name)
    batched, batched_greedy, batched_stats = score(model, 4, plan_name)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert batched_greedy == single_greedy
    assert_same_counts(batched_stats, single_stats)
    if plan_name.endswith(("0.25", "0.5")):
        assert any(c.skipped for c in single_stats.modules().values())
        assert not torch.allclose(single, score(model, 1, "gates, budget 0")[0], atol=1e-3)  # skipping mattered


@pytest.mark.parametrize("plan_name", ["gates, budget 0", "physical 0.25"])
def test_batched_rolling_loglikelihood_equals_batch_size_one(plan_name):
    """Rolling windows of 12 tokens: each passage's last window is shorter, so batches are padded."""
    model = gated_tiny()
    single, _, single_stats = score(model, 1, plan_name, rolling=True)
    batched, _, batched_stats = score(model, 4, plan_name, rolling=True)
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=0)
    assert_same_counts(batched_stats, single_stats)


def test_automatic_batch_size_scores_and_counts_as_batch_size_one():
    """lm-eval's batch_size="auto" probes with batches of its own; they are not counted as scored tokens."""
    model = gated_tiny()
    single, _, single_stats = score(model, 1, "physical 0.25")
    auto, _, auto_stats = score(model, "auto", "physical 0.25")
    torch.testing.assert_close(auto, single, atol=1e-4, rtol=0)
    assert_same_counts(auto_stats, single_stats)


def test_every_real_token_is_counted_once():
    """The token count is the requests' own tokens (one row per shared context), not batch x width."""
    model = gated_tiny()
    _, _, stats = score(model, 4, "physical 0.25")
    tok = char_tokenizer()
    rows = {tuple(tok.encode(c + x, add_special_tokens=False)[:-1]) for c, x in MIXED}
    assert stats.tokens == sum(len(r) for r in rows)


def test_batched_generation_equals_batch_size_one():
    """generate_until left-pads with an attention mask (HF generate): same texts and counts as batch 1."""
    model = gated_tiny()
    runs = []
    for batch_size in (1, 4):
        lm = GatedLM(model, char_tokenizer(), batch_size=batch_size)
        stats = SkipStats()
        lm.use(SkipPlan(budget=0.5, stats=stats))
        requests = [Instance("generate_until", doc={}, idx=i, arguments=(context, {"until": ["\n"], "max_gen_toks": 6}))
                    for i, (context, _) in enumerate(MIXED)]
        texts = lm.generate_until(requests, disable_tqdm=True)
        runs.append((texts, stats.tokens, {k: (c.seen, c.skipped) for k, c in stats.modules().items()}))
    assert runs[1] == runs[0]
