"""gateskip inside vLLM: the stock Llama, Mistral, Qwen2 and Gemma3 model classes with gated layers.

The plugin (gateskip.serving.plugin) registers these classes under the stock architecture
names. A model without gates (no EngineSpec, gateskip.serving.spec) is the stock class,
untouched. With gates, the forward below replaces the stock decoder loop and runs
gateskip.core.layer's definition on vLLM's flattened batch (the tokens of many requests, prefill
and decode mixed), viewed as one row of N tokens:

    h <- h + keep_attn * attn(norm_in(h)),   h <- h + keep_mlp * mlp(norm_post(h))

with the stock layers' arithmetic: a branch output is added by the next norm, which sums in fp32
and normalises the unrounded sum (vLLM's fused add-norm), so at target 0 the engine writes the
stock model's tokens in bf16 too, not only in fp32.

(Gemma3 also normalises each branch output before it is added, and normalises q and k per head.)

Decisions are gateskip.core.plan's ForwardContext with the target's calibrated thresholds: per
token and per module, so a request's tokens never depend on its batch-mates (design.md
section 7). What each decision costs here:
- a removed module (ratio 1) computes nothing. A removed attention module gets no Attention
  layer, so vLLM allocates it no KV cache. (Gates that protect a sequence's first token run
  it there alone; a first token attends only to itself, so its output is o_proj(v).)
- a partly skipped MLP runs its kept rows only (gather, run, index_add);
- a partly skipped attention module projects and attends every token, so the paged cache
  gets every token's K/V (design.md section 1), and runs o_proj on the kept rows. vLLM's
  attention metadata is built once per step for all layers, so skipped tokens' queries
  and scores are still computed (docs/serving.md says what that costs).

Decisions change shapes, so a gated engine runs eagerly (enforce_eager=True): a compiled or
CUDA graph would freeze them.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import get_pp_group
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ..core.layer import branch_norms
from ..core.model import read_gate_file
from ..core.plan import Decision, ForwardContext
from ..errors import GateSkipError
from .engine_skip import EngineSkip
from .spec import EngineSpec


def attention(attn: nn.Module, positions: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The attention branch's output for `rows` (None: every token) of x (N, d)."""
    if attn.attn is None:  # removed module: only protected first tokens run it, each its own only key
        qkv, _ = attn.qkv_proj(x[rows])
        v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)[2]
        group = attn.num_heads // attn.num_kv_heads
        o = v.view(-1, attn.num_kv_heads, 1, attn.head_dim).expand(-1, -1, group, -1).reshape(-1, attn.q_size)
        return attn.o_proj(o)[0]
    qkv, _ = attn.qkv_proj(x)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    if getattr(attn, "q_norm", None) is not None:  # Gemma3 (and Qwen2 with qk_norm): RMSNorm per head
        q = attn.q_norm(q.unflatten(-1, (attn.num_heads, attn.head_dim))).flatten(-2)
        k = attn.k_norm(k.unflatten(-1, (attn.num_kv_heads, attn.head_dim))).flatten(-2)
    q, k = attn.rotary_emb(positions, q, k)
    o = attn.attn(q, k, v)  # writes every token's K/V into the paged cache
    return attn.o_proj(o if rows is None else o[rows])[0]


def kept_rows(d: Decision) -> torch.Tensor | None:
    """Indices of the tokens that run a branch (None: all of them)."""
    return None if d.keep is None else d.keep[0].nonzero().squeeze(1)


def norm_adding(norm: nn.Module, h: torch.Tensor, pending: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h + pending), h + pending): the branch input and the residual stream with the last
    branch output added, as vLLM's layers compute them (the norm adds, in fp32, and normalises the
    unrounded sum), so a module that skips nothing computes exactly what the stock model does."""
    return (norm(h), h) if pending is None else norm(pending, h)


def branch_output(h: torch.Tensor, out: torch.Tensor, d: Decision, rows: torch.Tensor | None,
                  out_norm: nn.Module | None) -> torch.Tensor:
    """The branch outputs of `rows` as an (N, d) tensor for the next norm to add, zero for the
    tokens that skip (adding zero leaves their stream unchanged, bit for bit). Gemma3 normalises
    the outputs, soft gates scale them first."""
    if out_norm is not None:
        out = out_norm(out)
    if d.scale is not None:
        scale = d.scale[0]
        out = out * (scale if rows is None else scale[rows])
    return out if rows is None else torch.zeros_like(h).index_copy_(0, rows, out)


def gated_layer(layer: nn.Module, i: int, positions: torch.Tensor, h: torch.Tensor, pending: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One decoder layer on the flattened tokens, read top to bottom: h (N, d) is the residual stream,
    `pending` the last branch output, added by the next norm as in vLLM's stock layers."""
    norms = branch_norms(layer)
    norm_in, norm_out = norms["attn"]
    x = None
    if not ctx.removes("attn", i):
        (x, h), pending = norm_adding(norm_in, h, pending), None
    d = ctx.decide("attn", i, None if x is None else x[None])
    if not d.removed:
        rows = kept_rows(d)
        pending = branch_output(h, attention(layer.self_attn, positions, x, rows), d, rows, norm_out)

    norm_in, norm_out = norms["mlp"]
    x = None
    if not ctx.removes("mlp", i):
        (x, h), pending = norm_adding(norm_in, h, pending), None
    d = ctx.decide("mlp", i, None if x is None else x[None])
    if not d.removed:
        rows = kept_rows(d)
        pending = branch_output(h, layer.mlp(x if rows is None else x[rows]), d, rows, norm_out)
    return h, pending


class GatedForCausalLM:
    """Mixed in before a stock vLLM *ForCausalLM class: gates, decisions and accounting when the
    model has gates (self.skip), the stock model otherwise."""

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        model_config = vllm_config.model_config
        spec = EngineSpec.from_config(model_config.hf_config, model_config.model)
        self.skip: EngineSkip | None = None
        if spec is None:
            return
        if not model_config.enforce_eager:
            raise GateSkipError("a gated model needs enforce_eager=True: its per-token decisions change shapes, "
                                "which compiled and CUDA graphs would freeze")
        if get_pp_group().world_size > 1:
            raise GateSkipError("gateskip's vLLM engine does not support pipeline parallelism; use tensor parallelism")
        self.skip = EngineSkip(spec, model_config.hf_config)
        self.gate_bank = self.skip.bank  # a submodule: moves with the model, loaded in load_weights
        for i, layer in enumerate(self.model.layers):
            check_layer(layer)
            if i in self.skip.kv_less:  # no query of this module ever reads keys: no KV cache for it
                name = layer.self_attn.attn.layer_name
                del vllm_config.compilation_config.static_forward_context[name]
                layer.self_attn.attn = None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.skip is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        inner = self.model
        h = inner.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        pending = None
        with self.skip.lock:
            ctx = self.skip.context(positions)
            for i, layer in enumerate(inner.layers):
                h, pending = gated_layer(layer, i, positions, h, pending, ctx)
        return norm_adding(inner.norm, h, pending)[0]

    def load_weights(self, weights):
        """The stock weights through vLLM's loader; the gates from their own file (a gated folder's
        gateskip.safetensors also comes through vLLM's loader: it is passed over)."""
        if self.skip is None:
            return super().load_weights(weights)
        loaded = super().load_weights((n, w) for n, w in weights if not n.startswith("gates."))
        # Loaded again here, not only when the bank was built: vLLM builds models under its dtype (bf16
        # rounds fp32 gates) and device contexts (a meta device keeps no values); the bank is fp32 now.
        _, tensors = read_gate_file(self.skip.spec.gates)
        self.gate_bank.load_state_dict(tensors, strict=True)
        return set(loaded) | {f"gate_bank.{k}" for k in self.gate_bank.state_dict()}

    def gateskip_report(self) -> dict | None:
        """Counts and FLOP figures so far (None without gates): for `LLM.apply_model`."""
        if self.skip is None:
            return None
        with self.skip.lock:
            return self.skip.report()


def check_layer(layer: nn.Module) -> None:
    """Refuse variants whose attention this forward does not reproduce."""
    attn = layer.self_attn
    if getattr(attn, "do_llama_4_scaling", False) or getattr(attn, "dual_chunk_attention_config", None):
        raise GateSkipError("gateskip's vLLM engine does not support Llama-4 attention scaling or dual-chunk attention")


class GatedLlamaForCausalLM(GatedForCausalLM, LlamaForCausalLM):
    pass


class GatedMistralForCausalLM(GatedForCausalLM, MistralForCausalLM):
    pass


class GatedQwen2ForCausalLM(GatedForCausalLM, Qwen2ForCausalLM):
    pass


class GatedGemma3ForCausalLM(GatedForCausalLM, Gemma3ForCausalLM):
    pass
