"""An lm-eval model that runs every forward and every generation under a skip plan.

lm-eval's HFLM calls the model in two places: `_model_call` (log-likelihoods,
rolling perplexity) and `_model_generate` (generate_until). Both are overridden to pass
the current SkipPlan, so the harness measures the gated model with physical skipping,
not the base checkpoint. The plan is swapped between sweep points without reloading.
"""

from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from ..plan import SkipPlan


class GatedLM(HFLM):
    """HFLM around an in-memory (gated) model.

    batch_size defaults to 1: HFLM right-pads log-likelihood batches without passing an
    attention mask, and padding tokens would otherwise count as real tokens in the budget
    and in the FLOP accounting. At batch size 1 there is no padding.
    """

    def __init__(self, model, tokenizer, batch_size: int = 1, max_length: int | None = None):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         device=str(next(model.parameters()).device))
        self.score_plan: SkipPlan | None = None
        self.generate_plan: SkipPlan | None = None

    def use(self, score_plan: SkipPlan | None, generate_plan: SkipPlan | None = None) -> None:
        """Plans for the next requests: one for scoring (prefill), one for generation."""
        self.score_plan = score_plan
        self.generate_plan = generate_plan if generate_plan is not None else score_plan

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.score_plan is None:
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.model(inps, skip_plan=self.score_plan).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.generate_plan is not None:
            generation_kwargs["skip_plan"] = self.generate_plan
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
