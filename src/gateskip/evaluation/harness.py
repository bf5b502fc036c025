"""An lm-eval model that runs every forward and every generation under a skip plan.

lm-eval's HFLM calls the model in two places: `_model_call` (log-likelihoods,
rolling perplexity) and `_model_generate` (generate_until). Both are overridden to pass
the current SkipPlan, so the harness measures the gated model with physical skipping,
not the base checkpoint. The plan is swapped between sweep points without reloading.

Batched scoring: HFLM right-pads each log-likelihood batch with zeros inside
`_loglikelihood_tokens` and hands `_model_call` only the padded ids, with no attention
mask. Padding would then count as tokens in the skip budget (floor(ratio x tokens) per
sequence) and in SkipStats. While HFLM scores, GatedLM records the unpadded row lengths
at the point where HFLM pads them (`pad_and_concat`), and `_model_call` turns them into
an attention mask for the gated forward: results equal those of batch size 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from lm_eval.models import huggingface as hf
from lm_eval.models.huggingface import HFLM

from ..core.plan import SkipPlan
from ..errors import GateSkipError
from .batch import DEFAULT_BATCH_SIZE


class GatedLM(HFLM):
    """HFLM around an in-memory (gated) model; any batch size scores as batch size 1 would."""

    def __init__(self, model, tokenizer, batch_size: int | str = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                 max_batch_size: int = 64):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                         max_batch_size=max_batch_size, device=str(next(model.parameters()).device))
        self.score_plan: SkipPlan | None = None
        self.generate_plan: SkipPlan | None = None
        self._scoring = False  # inside _loglikelihood_tokens: every batch must come with its lengths
        self._row_lengths: list[int] | None = None  # real lengths of the batch HFLM padded last

    def use(self, score_plan: SkipPlan | None, generate_plan: SkipPlan | None = None) -> None:
        """Plans for the next requests: one for scoring (prefill), one for generation."""
        self.score_plan = score_plan
        self.generate_plan = generate_plan if generate_plan is not None else score_plan

    @contextmanager
    def _recording_lengths(self) -> Iterator[None]:
        """Wrap the `pad_and_concat` HFLM's scoring loop calls, to keep each row's length
        before padding (the padded ids alone cannot tell padding from token id 0)."""
        pad = hf.pad_and_concat

        def recording_pad(max_length: int, tensors: list[torch.Tensor], padding_side: str = "right"):
            self._row_lengths = [t.shape[-1] for t in tensors]
            return pad(max_length, tensors, padding_side)

        hf.pad_and_concat, self._scoring = recording_pad, True
        try:
            yield
        finally:
            hf.pad_and_concat, self._scoring, self._row_lengths = pad, False, None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # loglikelihood and loglikelihood_rolling both score through here.
        with self._recording_lengths():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # batch_size="auto" probes with unpadded batches of ones, from inside the scoring loop:
        # under the plan (same memory) but not counted in its statistics.
        scoring, plan = self._scoring, self.score_plan
        self._scoring = False
        self.score_plan = replace(plan, stats=None, trace=None) if plan is not None else None
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._scoring, self.score_plan = scoring, plan

    def _padding_mask(self, inps: torch.Tensor) -> torch.Tensor | None:
        """(batch, keys) mask of the real tokens of a right-padded batch; None without padding."""
        lengths, self._row_lengths = self._row_lengths, None
        if lengths is None:
            if self._scoring and inps.shape[0] > 1:  # HFLM no longer pads through pad_and_concat
                raise GateSkipError("GatedLM could not find the padding of an lm-eval batch; use batch size 1")
            return None  # one row, or outside scoring: nothing is padded
        if len(lengths) != inps.shape[0] or max(lengths) != inps.shape[1]:
            raise GateSkipError(f"lm-eval batch {tuple(inps.shape)} does not match the recorded lengths {lengths}")
        if min(lengths) == inps.shape[1]:
            return None
        lengths_t = torch.tensor(lengths, device=inps.device)
        return (torch.arange(inps.shape[1], device=inps.device) < lengths_t[:, None]).long()

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        mask = self._padding_mask(inps)
        if self.score_plan is None:  # plain HFLM: causal attention, right padding changes no real logit
            return super()._model_call(inps, attn_mask, labels)
        with torch.no_grad():
            return self.model(inps, attention_mask=mask, skip_plan=self.score_plan).logits

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if self.generate_plan is not None:
            generation_kwargs["skip_plan"] = self.generate_plan
        return super()._model_generate(context, max_length, stop, **generation_kwargs)
