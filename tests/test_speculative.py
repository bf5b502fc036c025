"""Self-speculative decoding is lossless: greedy output equals full-compute greedy output,
sampling follows the full model's distribution, and the shared cache is cropped right."""

import pytest
import torch
from scipy.stats import chisquare

from transformers import Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM

from gateskip import GateConfig, GateSkipError, SkipPlan, add_gates
from gateskip.inference.calibrate import calibrate
from gateskip.inference.speculative import speculative_generate
from test_generation import VOCAB, calibrated, random_prompts

torch.set_num_threads(1)


def full_greedy(model, ids, new):
    """The reference: HF generate on the gated model at full compute (gates applied, no skipping)."""
    return model.generate(ids, skip_plan=SkipPlan(budget=None), max_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_greedy_output_is_identical_to_full_compute_greedy(family, ratio):
    model = calibrated(family)
    drafted = accepted = 0
    for seed in range(6):
        ids, _ = random_prompts([3 + 2 * seed], seed=seed)
        reference = full_greedy(model, ids, 20)
        for k in (1, 2, 4, 8):
            result = speculative_generate(model, ids, budget=ratio, k=k, max_new_tokens=20)
            assert torch.equal(result.sequences, reference), (seed, k)
            drafted, accepted = drafted + result.drafted, accepted + result.accepted
        adaptive = speculative_generate(model, ids, budget=ratio, k=2, max_new_tokens=20, adaptive=True)
        assert torch.equal(adaptive.sequences, reference)
    assert 0 < accepted < drafted  # the draft really differs from the full model, and sometimes agrees


def sliding_window_model(family: str):
    """A tiny calibrated model whose attention layers keep only a window of K/V."""
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=4))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]))
    model.config._attn_implementation = "sdpa"
    add_gates(model.eval(), GateConfig(kind="vector"))
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None
    calibrate(model, random_prompts([48] * 6, seed=100), [0.5])
    return model


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_caches_roll_back_losslessly(family):
    """Prompts longer than the window: rollback must restore K/V a draft pushed out of the window."""
    model = sliding_window_model(family)
    window = model.config.sliding_window
    drafted = accepted = 0
    for seed in range(2):
        ids, _ = random_prompts([2 * window + 3 + seed], seed=seed)
        reference = full_greedy(model, ids, 16)
        for k in (1, 3, window + 2):
            result = speculative_generate(model, ids, budget=0.5, k=k, max_new_tokens=16)
            assert torch.equal(result.sequences, reference), (seed, k)
            drafted, accepted = drafted + result.drafted, accepted + result.accepted
        adaptive = speculative_generate(model, ids, budget=0.5, k=2, max_new_tokens=16, adaptive=True)
        assert torch.equal(adaptive.sequences, reference)
    assert 0 < accepted < drafted


def test_says_when_the_context_ends_first():
    model = calibrated("llama")  # a context of 128 tokens
    ids, _ = random_prompts([120], seed=3)
    result = speculative_generate(model, ids, budget=0.5, k=4, max_new_tokens=20)
    assert result.new_tokens == 8 and result.context_full and "context" in result.summary()
    assert torch.equal(result.sequences, full_greedy(model, ids, 8))
    assert not speculative_generate(model, ids[:, :100], budget=0.5, k=4, max_new_tokens=20).context_full


def test_verify_passes_see_exactly_the_full_compute_cache(monkeypatch):
    """Every verify pass gives the logits of a full forward without cache: draft K/V never leak."""
    from gateskip.inference import decoding

    model = calibrated("llama")
    ids, _ = random_prompts([6], seed=11)
    verified = []
    step = decoding.Stepper.__call__

    def record(self, tokens, positions, ctx, key_valid=None, logits_to_keep=1):
        logits = step(self, tokens, positions, ctx, key_valid, logits_to_keep)
        if ctx.plan.budget is None:
            verified.append((self.cache.length, tokens[0].tolist(), logits[0]))
        return logits

    monkeypatch.setattr(decoding.Stepper, "__call__", record)
    result = speculative_generate(model, ids, budget=0.5, k=4, max_new_tokens=24)
    final = result.sequences[0].tolist()
    with torch.no_grad():
        reference = model(result.sequences, skip_plan=SkipPlan(budget=None), use_cache=False).logits[0]
    rows = 1  # the prefill's token
    for length, inputs, logits in verified:
        start = length - len(inputs)  # position of the first input token
        for i, row in enumerate(logits):
            pos = length - len(logits) + i  # the position whose next token this row predicts
            if pos >= len(final) - 1 or inputs[: pos - start + 1] != final[start : pos + 1]:
                break  # from a rejected draft on, the rows belong to text that was thrown away
            assert torch.allclose(row, reference[pos], atol=1e-4, rtol=0), pos
            rows += 1
    assert rows == result.new_tokens  # every kept token was chosen from a checked row
    assert len(verified) + 1 == result.passes and result.passes < result.new_tokens


def test_draft_length_follows_measured_acceptance_and_cost():
    from gateskip.inference.speculative import DraftLength

    good = DraftLength(k=2, max_k=8)
    for _ in range(20):  # drafts accepted 90 % of the time at a fifth of a verify pass
        good.update(drafted=5, accepted=4 if _ % 2 else 5, draft_seconds=5 * 0.02, verify_seconds=0.1)
    assert good.next() >= 4
    bad = DraftLength(k=2, max_k=8)
    for _ in range(20):  # drafts that are rarely right and nearly as dear as the full model
        bad.update(drafted=2, accepted=0, draft_seconds=2 * 0.09, verify_seconds=0.1)
    picks = [bad.next() for _ in range(2 * DraftLength.PROBE_EVERY)]
    assert picks.count(0) > len(picks) - 3 and 1 in picks  # plain decoding, with a probe now and then


def exact_joint(model, prompt, vocab, steps, plan):
    """Probability of every continuation of `steps` tokens under `plan`, by enumeration."""
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * steps).reshape(-1, steps)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(full, skip_plan=plan, use_cache=False).logits.double(), -1)
    n = prompt.shape[1]
    return logp[:, n - 1 : -1].gather(-1, seqs[..., None]).squeeze(-1).sum(1).exp()


def test_sampling_keeps_the_full_models_distribution():
    from gateskip.inference.calibrate import threshold_budget

    vocab, steps, draws = 4, 3, 600
    model = calibrated("llama", seed=1, vocab=vocab, ratios=(0.8,))
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # peaked distributions, so skipping moves them
    prompt = torch.tensor([[1, 3, 2]])
    target = exact_joint(model, prompt, vocab, steps, SkipPlan(budget=None))
    drafty = exact_joint(model, prompt, vocab, steps, SkipPlan(budget=threshold_budget(model, 0.8)))
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab**steps)
    rejected = 0
    for _ in range(draws):  # one full token from the prefill, then 2 drafted and verified
        out = speculative_generate(model, prompt, budget=0.8, k=2, max_new_tokens=steps, do_sample=True, generator=generator)
        new = out.sequences[0, prompt.shape[1]:].tolist()
        counts[sum(t * vocab ** (steps - 1 - i) for i, t in enumerate(new))] += 1
        rejected += out.drafted - out.accepted
    assert rejected > draws / 10  # the rejection rule really had work to do

    def p_value(probs):
        expected = probs * draws
        small = expected < 5  # pool rare outcomes into one cell
        obs = torch.cat([counts[~small], counts[small].sum()[None]])
        exp = torch.cat([expected[~small], expected[small].sum()[None]])
        return chisquare(obs.numpy(), exp.numpy()).pvalue

    assert p_value(target) > 0.01
    assert p_value(drafty) < 1e-6  # the test can tell the draft's distribution apart


def test_reports():
    model = calibrated("llama")
    ids, _ = random_prompts([5], seed=2)
    result = speculative_generate(model, ids, budget=0.5, k=3, max_new_tokens=16)
    assert result.new_tokens == 16
    assert result.tokens_per_pass == 16 / result.passes
    assert 0 <= result.acceptance_rate <= 1 and "tokens/pass" in result.summary()
    drafts = result.draft_stats.modules().values()
    assert 0.3 < sum(c.skipped for c in drafts) / sum(c.seen for c in drafts) < 0.7
    assert result.flops(model).tokens == result.draft_stats.tokens + result.verify_stats.tokens


def test_stops_at_the_stop_token_and_streams_what_it_keeps():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.reshape(-1).tolist())

        def end(self):
            pass

    model = calibrated("llama")
    ids, _ = random_prompts([5], seed=2)
    free = speculative_generate(model, ids, budget=0.5, k=4, max_new_tokens=16).sequences[0, 5:].tolist()
    stop = free[6]
    streamer = Collect()
    result = speculative_generate(model, ids, budget=0.5, k=4, max_new_tokens=16, eos_token_id=stop, streamer=streamer)
    assert result.sequences[0, 5:].tolist() == free[: free.index(stop) + 1]
    assert sum(streamer.tokens[1:], []) == result.sequences[0, 5:].tolist()


def test_bad_inputs_give_clear_errors():
    model = calibrated("llama", ratios=(0.25,))
    ids, _ = random_prompts([5])
    cases = [
        (dict(budget=1.5), r"\[0, 1\]"),
        (dict(budget=-0.1), r"\[0, 1\]"),
        (dict(budget=0.5), "not calibrated"),
        (dict(budget=0.25, k=0), "k must be"),
        (dict(budget=0.25, input_ids=ids[:, :0]), "empty"),
        (dict(budget=0.25, input_ids=torch.randint(3, 50, (1, 200))), "context"),
        (dict(budget=0.25, input_ids=ids.expand(2, -1)), "one prompt"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("input_ids", ids)
        with pytest.raises(GateSkipError, match=message):
            speculative_generate(model, **kwargs)
