"""vLLM's entry point for gateskip (group `vllm.general_plugins`, pyproject.toml).

vLLM calls register() in every process it starts, workers included, before building a
model. It puts gateskip's classes (gateskip.serving.vllm_model) under the stock
architecture names, lazily: nothing is imported until vLLM builds a model. A model without
gates then runs the stock classes' code unchanged; `VLLM_PLUGINS=` (empty) or a list
without `gateskip` turns the plugin off.
"""

from __future__ import annotations

MODULE = "gateskip.serving.vllm_model"
ARCHITECTURES = {
    "LlamaForCausalLM": "GatedLlamaForCausalLM",
    "MistralForCausalLM": "GatedMistralForCausalLM",
    "Qwen2ForCausalLM": "GatedQwen2ForCausalLM",
    "Gemma3ForCausalLM": "GatedGemma3ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry

    for arch, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, f"{MODULE}:{cls}")
