"""Tiny random-config models: every unit test runs in seconds on a CPU."""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)

VOCAB = 101


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A random model of `family`; overrides change its config (e.g. a width vLLM's kernels take)."""
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    ) | overrides
    if family == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    elif family == "mistral":
        cfg, cls = MistralConfig(**common), MistralForCausalLM
    elif family == "gemma3":
        gemma = dict(head_dim=common["hidden_size"] // 4, sliding_window=8,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"]) | common
        cfg, cls = Gemma3TextConfig(**gemma), Gemma3ForCausalLM
    else:
        raise ValueError(family)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


def padded_batch(lengths: list[int], width: int, side: str = "right", seed: int = 0):
    """Random token ids (B, width) with an attention mask that pads each row to `width`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, width - n:] = 1
    return ids, mask


@pytest.fixture(params=["llama", "qwen2"])
def llama_family(request):
    return request.param
