"""Cached decoding under a threshold budget: same tokens and logits as recomputing
without a cache, through Hugging Face generate (greedy, sampling, stopping, streamers)."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gateskip import GateConfig, SkipPlan, SkipStats, ThresholdBudget, add_gates

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
