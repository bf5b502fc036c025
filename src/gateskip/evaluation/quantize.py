"""Weight-only quantisation of the backbone through torchao; the gates stay in full precision.

Only the decoder layers' linear projections are quantised. The gates are left alone
because their importance ranking decides what skips, and the LM head is left alone
because it is usually tied to the input embedding, which torchao does not handle.

What torchao 0.18 can run:
- int8: Int8WeightOnlyConfig (per-channel), on CPU and GPU.
- int4 on CUDA: Int4WeightOnlyConfig with the tinygemm tile-packed layout (bfloat16 model).
- int4 on CPU: torchao 0.18 has no CPU kernel for Int4WeightOnlyConfig, so int4 uses
  IntxWeightOnlyConfig (int4 values, per-group scales, stored unpacked in int8 bytes):
  the accuracy of int4 weights, but neither int4's memory nor its speed.
"""

from __future__ import annotations

import torch

from ..core.model import decoder_layers
from ..errors import GateSkipError

SCHEMES = ("int8", "int4")
INT4_GROUP = 128


def _group_size(widths: set[int]) -> int:
    """The largest int4 group that divides every projection's input width."""
    for group in (INT4_GROUP, 64, 32):
        if all(w % group == 0 for w in widths):
            return group
    raise GateSkipError(f"int4 needs projection input widths divisible by 32, got {sorted(widths)}")


def _config(scheme: str, device: torch.device, dtype: torch.dtype, widths: set[int]):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if scheme == "int8":
        return Int8WeightOnlyConfig()
    group = _group_size(widths)
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            raise GateSkipError("int4 on CUDA uses torchao's tinygemm kernel, which needs a bfloat16 model (--dtype bfloat16)")
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group))


def quantize_weights(model, scheme: str):
    """Quantise the decoder layers' linear weights in place (`scheme`: int8 or int4); returns the model."""
    from torchao.quantization import quantize_

    if scheme not in SCHEMES:
        raise GateSkipError(f"unknown quantisation {scheme!r}; choose from {', '.join(SCHEMES)}")
    layers = decoder_layers(model)
    param = next(layers.parameters())
    widths = {m.in_features for m in layers.modules() if isinstance(m, torch.nn.Linear)}
    config = _config(scheme, param.device, param.dtype, widths)
    for layer in layers:
        quantize_(layer, config, filter_fn=lambda module, fqn: isinstance(module, torch.nn.Linear))
    return model
