"""The lean decoder (gateskip.inference.decoding) gives HF generate's tokens under the same budget, on
every supported family, sliding windows and left-padded batches included; a batch whose rows
skip different modules runs each module on its kept rows only and equals decoding each row alone."""

import pytest
import torch

from gateskip.inference.decoding import decode
from gateskip.inference.generation import generate
from test_generation import calibrated, random_prompts
from test_speculative import sliding_window_model

torch.set_num_threads(1)


def model_for(family):
    return calibrated(family) if family in ("llama", "qwen2") else sliding_window_model(family)


def skipped(stats):
    return sum(c.skipped for c in stats.modules().values())


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_same_tokens_and_accounting_as_hf_generate(family):
    model = model_for(family)
    for lengths in ([21], [21, 9, 14]):
        ids, mask = random_prompts(lengths, seed=len(lengths))
        mask = mask if len(lengths) > 1 else None
        for budget in (0.0, 0.5):
            reference = generate(model, ids, mask, budget=budget, max_new_tokens=10, do_sample=False, pad_token_id=0)
            ours = decode(model, ids, mask, budget=budget, max_new_tokens=10)
            assert torch.equal(ours.sequences, reference.sequences), (lengths, budget)
            assert skipped(ours.decode) == skipped(reference.decode) and ours.decode.tokens == reference.decode.tokens
            assert (skipped(ours.decode) > 0) == (budget > 0)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_batched_rows_skip_alone_and_equal_decoding_each_row_alone(family):
    model = model_for(family)
    lengths = [12, 5, 9, 12]
    ids, mask = random_prompts(lengths, seed=7)
    rows_seen = []
    hook = model.model.layers[1].mlp.register_forward_hook(lambda m, args, out: rows_seen.append(args[0].shape[0]))
    batched = decode(model, ids, mask, budget=0.5, max_new_tokens=10)
    hook.remove()
    assert any(0 < n < len(lengths) for n in rows_seen)  # some step ran the MLP on a strict subset of rows
    for i, n in enumerate(lengths):
        alone = decode(model, ids[i : i + 1, -n:], None, budget=0.5, max_new_tokens=10)
        assert torch.equal(batched.sequences[i, -10:], alone.sequences[0, -10:]), i


def test_stop_tokens_pad_finished_rows_and_end_when_all_stop():
    model = calibrated("llama")
    ids, mask = random_prompts([8, 6], seed=3)
    free = decode(model, ids, mask, budget=0.5, max_new_tokens=12).sequences[:, 8:]
    stop = int(free[0, 3])
    out = decode(model, ids, mask, budget=0.5, max_new_tokens=12, eos_token_id=stop, pad_token_id=0).sequences[:, 8:]
    first = free[0].tolist().index(stop)
    assert out[0, : first + 1].tolist() == free[0, : first + 1].tolist() and set(out[0, first + 1 :].tolist()) <= {0}
    row1 = free[1].tolist()
    if stop in row1:
        assert out.shape[1] == max(first, row1.index(stop)) + 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compiled_decoding_gives_the_eager_tokens_and_accounting(family):
    """decode(compile=True): each module's dense compute through torch.compile, attention over the
    whole static cache with the unwritten (and out-of-window) positions masked; the decisions stay
    eager. Gemma3: sliding layers (window 8) beside full ones, q/k norms, prompts past the window."""
    from gateskip.inference.decoding import KERNELS

    model = model_for(family)
    cases = [([9], 0.0), ([9], 0.5), ([9, 5], 0.5)] if family == "llama" else [([12], 0.5), ([12, 5], 0.5)]
    for lengths, budget in cases:
        ids, mask = random_prompts(lengths, seed=4)
        mask = mask if len(lengths) > 1 else None
        eager = decode(model, ids, mask, budget=budget, max_new_tokens=8)
        compiled = decode(model, ids, mask, budget=budget, max_new_tokens=8, compile=True)
        assert torch.equal(compiled.sequences, eager.sequences), (lengths, budget)
        assert skipped(compiled.decode) == skipped(eager.decode) and (skipped(eager.decode) > 0) == (budget > 0)
    assert all(k.compiled is not None and not k.failed for k in (KERNELS.keys, KERNELS.attend, KERNELS.mlp))


def test_compile_failure_warns_once_and_decodes_eagerly(monkeypatch):
    import gateskip.inference.decoding
    from gateskip.inference.compiled import Compiled
    from gateskip.core.execution import StepKernels, step_attend, step_keys, step_mlp

    def broken(fn):
        def run(*args):
            raise RuntimeError("no compiler here\nmore detail")
        return run

    kernels = StepKernels(Compiled(step_keys), Compiled(step_attend), Compiled(step_mlp))
    monkeypatch.setattr(gateskip.inference.decoding, "KERNELS", kernels)
    monkeypatch.setattr(torch, "compile", broken)
    model = calibrated("llama")
    ids, _ = random_prompts([9], seed=4)
    with pytest.warns(RuntimeWarning, match="decoding eagerly") as caught:
        fallback = decode(model, ids, budget=0.5, max_new_tokens=8, compile=True)
    assert [str(w.message) for w in caught] == [  # one line per kernel, at its first call
        f"torch.compile failed for {name} (RuntimeError: no compiler here); decoding eagerly"
        for name in ("step_keys", "step_attend", "step_mlp")]
    assert torch.equal(fallback.sequences, decode(model, ids, budget=0.5, max_new_tokens=8).sequences)


def test_removed_attention_writes_no_keys_and_changes_no_token():
    """Under an allocation that removes modules, the lean decoder computes no K/V for a removed
    attention module (no query of it reads them until a full-compute pass rewrites the cache),
    and its tokens still equal HF generate's, which computes them; speculative drafts under it
    stay lossless."""
    from gateskip import AllocationBudget
    from gateskip.inference.speculative import speculative_generate

    model = calibrated("llama")
    half = model.gate_bank.thresholds["0.5"]
    budget = AllocationBudget({"attn.1": 1.0, "mlp.2": 1.0, "attn.0": 0.5, "mlp.0": 0.5}, 0.3,
                              thresholds={"attn.0": half["attn.0"], "mlp.0": half["mlp.0"]})
    ids, mask = random_prompts([21, 9, 14], seed=3)
    reference = generate(model, ids, mask, budget=budget, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = decode(model, ids, mask, budget=budget, max_new_tokens=10)
    assert torch.equal(ours.sequences, reference.sequences)
    assert skipped(ours.decode) == skipped(reference.decode)
    assert ours.decode.modules()["attn.1"].kv_skipped == ours.decode.tokens > 0
    assert reference.decode.modules()["attn.1"].kv_skipped == 0
    one = ids[:1]
    full = generate(model, one, None, budget=None, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for k in (1, 3):
        assert torch.equal(speculative_generate(model, one, budget=budget, k=k, max_new_tokens=12).sequences, full.sequences)
