"""Cached decoding under a threshold budget: same tokens and logits as recomputing
without a cache, through Hugging Face generate (greedy, sampling, stopping, streamers)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gateskip import GateConfig, GateSkipError, QuantileBudget, SkipPlan, SkipStats, add_gates
from gateskip.inference.calibrate import threshold_budget
from gateskip.inference.contract import reports
from gateskip.inference.generation import generate

torch.set_num_threads(1)
VOCAB = 61


def gated_tiny(family: str = "llama", seed: int = 0, kind: str = "vector", vocab: int = VOCAB, context: int = 128):
    """A tiny random model with spread-out gates, so thresholds skip some tokens and keep others."""
    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=context,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    cfg._attn_implementation = "sdpa"
    model = (LlamaForCausalLM if family == "llama" else Qwen2ForCausalLM)(cfg).eval()
    add_gates(model, GateConfig(kind=kind, rank=8))
    with torch.no_grad():
        for p in model.gate_bank.parameters():
            p.normal_(0.0, 0.3)
    return model


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (B, max length) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
        ids[i, : width - n] = 0
    return ids, mask


def calibrated(family: str = "llama", ratios=(0.25, 0.5), seed: int = 0, vocab: int = VOCAB):
    from gateskip.inference.calibrate import calibrate

    model = gated_tiny(family, seed=seed, vocab=vocab)
    model.generation_config.eos_token_id = None  # random models may emit any token; run to max_new_tokens
    calibrate(model, random_prompts([48] * 6, seed=100 + seed, vocab=vocab), list(ratios))
    return model


def recomputed_logits(model, sequences, mask, budget):
    """Logits of the whole sequence in one forward without a cache, under the same budget
    (positions counted from each row's first real token, as HF generate counts them)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(sequences, attention_mask=mask, position_ids=positions, skip_plan=SkipPlan(budget=budget),
                     use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize("lengths", [[9], [9, 4, 7]])
@pytest.mark.parametrize("do_sample", [False, True])
def test_cached_decoding_equals_recomputing_without_cache(family, ratio, lengths, do_sample):
    model = calibrated(family)
    ids, mask = random_prompts(lengths, seed=len(lengths))
    torch.manual_seed(0)
    gen = generate(model, ids, mask, budget=ratio, max_new_tokens=12, do_sample=do_sample,
                   return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    new = 12
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], 1)
    reference = recomputed_logits(model, gen.sequences, full_mask, threshold_budget(model, ratio))
    cached = torch.stack(gen.output.logits, 1)  # logits that chose each new token
    assert torch.allclose(cached, reference[:, -new - 1 : -1], atol=1e-4, rtol=0)
    if not do_sample:
        assert torch.equal(gen.sequences[:, -new:], reference[:, -new - 1 : -1].argmax(-1))
    decoded = gen.decode.modules()
    assert 0 < sum(c.skipped for c in decoded.values()) < sum(c.seen for c in decoded.values())


def count_calls(model, names: list[str]) -> dict[str, int]:
    """Forward-hook counters on every decoder layer's submodules of these names."""
    calls = dict.fromkeys(names, 0)
    for layer in model.model.layers:
        for name in names:
            module = layer.get_submodule(name)

            def hook(*_, name=name):
                calls[name] += 1

            module.register_forward_hook(hook)
    return calls


def test_when_every_token_skips_a_branch_only_the_key_value_projections_run():
    model = calibrated("llama", ratios=(1.0,))
    calls = count_calls(model, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp"])
    ids, mask = random_prompts([6, 3], seed=5)
    generate(model, ids, mask, budget=1.0, max_new_tokens=5, do_sample=False, pad_token_id=0)
    layers, forwards = len(model.model.layers), 5
    assert calls == {"self_attn.q_proj": 0, "self_attn.o_proj": 0, "mlp": 0,
                     "self_attn.k_proj": layers * forwards, "self_attn.v_proj": layers * forwards}


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_batch_one_decoding_skips_close_to_the_calibrated_ratio(ratio):
    model = calibrated("qwen2")
    ids, _ = random_prompts([4], seed=6)
    torch.manual_seed(1)  # sampled text looks like the random calibration text; greedy text loops
    gen = generate(model, ids, budget=ratio, max_new_tokens=60, do_sample=True, pad_token_id=0)
    decoded = gen.decode.modules().values()
    assert gen.decode.tokens == 59
    assert abs(sum(c.skipped for c in decoded) / sum(c.seen for c in decoded) - ratio) < 0.08


def test_streamers_stopping_criteria_and_reports():
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    class StopAtLength(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 12, dtype=torch.bool)

    model = calibrated("llama")
    ids, _ = random_prompts([7], seed=7)
    streamer = Collect()
    gen = generate(model, ids, budget=0.5, max_new_tokens=30, do_sample=False, streamer=streamer,
                   stopping_criteria=StoppingCriteriaList([StopAtLength()]), pad_token_id=0)
    assert gen.sequences.shape[1] == 12 and streamer.ended
    assert streamer.chunks[0] == ids[0].tolist()
    assert sum(streamer.chunks[1:], []) == gen.sequences[0, 7:].tolist()
    parts = reports(model, gen.prefill, gen.decode)
    assert parts["decoding"].tokens == 4 and parts["generation"].tokens == 11
    assert 0 < parts["decoding"].paper_fraction < 1
    whole = flop_report_of_one_stats(model, ids, gen.sequences)
    assert parts["generation"].dense_flops == pytest.approx(whole.dense_flops)


def flop_report_of_one_stats(model, prompt, sequences):
    """The same generation with a single SkipStats for every forward, for cross-checking."""
    from gateskip import ModelDims, flop_report

    stats = SkipStats()
    model.generate(prompt, skip_plan=SkipPlan(budget=threshold_budget(model, 0.5), stats=stats),
                   max_new_tokens=sequences.shape[1] - prompt.shape[1], do_sample=False, pad_token_id=0)
    return flop_report(stats, ModelDims.from_config(model.config), model.gate_bank.config)


def test_bad_inputs_give_clear_errors():
    model = calibrated("llama", ratios=(0.25,))
    ids, _ = random_prompts([5])
    with pytest.raises(GateSkipError, match="not calibrated"):
        generate(model, ids, budget=0.5, max_new_tokens=2)
    with pytest.raises(GateSkipError, match=r"\[0, 1\]"):
        generate(model, ids, budget=-0.5, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="empty"):
        generate(model, ids[:, :0], budget=0.25, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="context is 128"):
        generate(model, torch.randint(3, VOCAB, (1, 128)), budget=0.25, max_new_tokens=2)
    with pytest.raises(GateSkipError, match="quantile"):
        generate(model, ids, budget=QuantileBudget(0.25), max_new_tokens=2)


def test_generate_without_skipping_is_exactly_hf_generate_on_the_original_model():
    """Left padding and prefill logits handled as for the original model (positions from the
    mask; the LM head runs on the last prompt token only)."""
    from gateskip import remove_gates

    model = gated_tiny("llama")
    model.generation_config.eos_token_id = None
    ids, mask = random_prompts([9, 4, 7], seed=8)
    head_rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape[1]))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    gated = model.generate(ids, attention_mask=mask, skip_plan=SkipPlan(apply_gates=False), **kwargs)
    assert head_rows == [1] * 6
    plain = remove_gates(model).generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(gated.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gated.logits, plain.logits))


@pytest.mark.slow
def test_cli_calibrates_and_generates_on_the_bundled_model(tmp_path, capsys):
    import argparse

    from gateskip.inference import calibrate as calibrate_cli
    from gateskip.inference import generation as generation_cli
    from gateskip import save_gates
    from gateskip.loading import load_model

    model, _ = load_model("smollm2-135m")
    save_gates(add_gates(model, GateConfig(kind="lowrank", rank=8)), tmp_path)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    calibrate_cli.register(sub)
    generation_cli.register(sub)

    def run(*argv):
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    assert "calibrated ratios 0.5 on 128 tokens" in run("calibrate", "smollm2-135m", "--gates", str(tmp_path),
                                                      "--ratios", "0.5", "--sequences", "2", "--length", "64")
    out = run("generate", "smollm2-135m", "--gates", str(tmp_path), "--budget", "0.5", "--prompt", "Hello", "--max-new-tokens", "6")
    assert "per generated token (5 tokens): skipped" in out and "whole generation" in out
    out = run("generate", "smollm2-135m", "--gates", str(tmp_path), "--budget", "0.5", "--speculative", "2",
              "--prompt", "Hello", "--max-new-tokens", "6")
    assert "self-speculative:" in out and "tokens/pass" in out and "drafts accepted" in out  # may stop early at EOS


def cli_args(tmp_path, *options):
    import argparse

    from gateskip.inference import generation as generation_cli

    parser = argparse.ArgumentParser()
    generation_cli.register(parser.add_subparsers())
    return parser.parse_args(["generate", "m", "--gates", str(tmp_path), "--prompt", "-", *options])


def skipped(stats):
    return sum(c.skipped for c in stats.modules().values())


@pytest.mark.parametrize("options", [[], ["--sample", "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9"],
                                     ["--sample"]])
def test_cli_decoding_gives_the_tokens_hf_generate_gave(tmp_path, options):
    """`gateskip generate` decodes with gateskip.inference.decoding; its options give what the HF generate
    call it replaced gave: greedy, sampling from the same seed, stopping at the model's stop token."""
    from gateskip.inference.generation import decode_prompt

    model = calibrated("llama")
    ids, _ = random_prompts([7], seed=9)
    args = cli_args(tmp_path, "--budget", "0.5", "--max-new-tokens", "16", *options)
    if args.sample:
        hf = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or 0, top_p=args.top_p)
    else:
        hf = dict(do_sample=False, temperature=None, top_k=None, top_p=None)

    def old(seed=0):
        torch.manual_seed(seed)
        return generate(model, ids, budget=0.5, max_new_tokens=16, pad_token_id=0, **hf)

    model.generation_config.eos_token_id = int(old().sequences[0, 7 + 5])  # stop on the sixth new token (or before)
    reference = old()
    torch.manual_seed(0)
    ours = decode_prompt(model, ids, args)
    assert reference.sequences.shape[1] < 7 + 16 and torch.equal(ours.sequences, reference.sequences)
    assert skipped(ours.decode) == skipped(reference.decode) > 0 and ours.decode.tokens == reference.decode.tokens


def test_cli_refuses_generation_options_the_lean_decoder_does_not_apply(tmp_path):
    from gateskip.inference.generation import decode_prompt

    model = calibrated("llama")
    model.generation_config.repetition_penalty = 1.3
    with pytest.raises(GateSkipError, match=r"^the model's generation_config sets repetition_penalty=1.3, which gateskip generate"):
        decode_prompt(model, random_prompts([5])[0], cli_args(tmp_path))
    model.generation_config.repetition_penalty = 1.0  # a value that changes nothing passes
    decode_prompt(model, random_prompts([5])[0], cli_args(tmp_path, "--max-new-tokens", "2"))
