"""Training on a model held the way the WebUI holds it: fp16 weights by default, bf16 with some options, and
float8 Linear/Conv2d weights with its FP8 weight option (Settings → Optimizations).

The weights are never changed. What a training step needs from such a model:
- each adapted layer adds W + ΔW in float32 and rounds once to the op's dtype (`merge`);
- a float8 Linear or Conv2d runs with its weights cast per call, as the WebUI's autocast does at inference;
- a GroupNorm or LayerNorm held in fp16/bf16 runs in float32 under autocast, as CUDA's autocast runs norms
  by itself (CPU autocast does not, and CPU torch 2.1 has no fp16 norm kernels); without autocast its weights
  are cast to the input's dtype, as the WebUI's own `devices.manual_cast` does on devices without autocast.
These routes are instance forwards that ModelGuard removes after the run; a float32 model gets none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import compat
from .errors import LohatrainError

NORMS = (nn.GroupNorm, nn.LayerNorm)
COMPUTE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_precision(unet: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> None:
    """Refuse, before anything runs, a train format that this model and this torch cannot train in."""
    dtypes = {p.dtype for p in unet.parameters()}
    if compute_dtype == torch.float32 and dtypes != {torch.float32}:
        held = "FP8 (Settings → Optimizations → FP8 weight)" if compat.FP8_DTYPES & dtypes else "half precision (fp16/bf16)"
        raise LohatrainError(
            f"the WebUI holds this model in {held}, so it cannot train in fp32: set Train format to fp16 or "
            "bf16, or restart the WebUI with --no-half (full precision, twice the memory) to train in fp32")
    if not compat.autocast_supports(device.type, compute_dtype):
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[compute_dtype]
        raise LohatrainError(
            f"torch {torch.__version__} cannot train in {name} on the {device.type.upper()}: set Train format to "
            + ("bf16 or fp32" if device.type == "cpu" else "fp32"))


def merge(weight: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W + ΔW added in float32 and rounded once to the op's dtype: rounding ΔW to a fp16 W's dtype before
    adding would round twice, and float8 has no arithmetic at all."""
    return (weight.float() + delta.float()).to(dtype)


def route_low_precision_layers(roots, compute_dtype: torch.dtype) -> None:
    """Give float8 Linear/Conv2d layers and mixed-dtype norms their casting forward (see the module's doc)."""
    for root in roots:
        for module in root.modules() if root is not None else ():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.dtype in compat.FP8_DTYPES:
                module.forward = _cast_weight_forward(module, compute_dtype)
            elif isinstance(module, NORMS) and module.weight is not None and module.weight.dtype != torch.float32:
                module.forward = _cast_norm_forward(module)


def _cast_weight_forward(module: nn.Module, compute_dtype: torch.dtype):
    def forward(x):
        dtype = compat.autocast_dtype(x.device.type) or compute_dtype
        weight = module.weight.to(dtype)
        bias = module.bias.to(dtype) if module.bias is not None else None
        if isinstance(module, nn.Linear):
            return F.linear(x.to(dtype), weight, bias)
        return module._conv_forward(x.to(dtype), weight, bias)

    return forward


def _cast_norm_forward(module: nn.Module):
    def forward(x):
        # Under autocast a norm runs in float32, as CUDA's autocast runs every norm (its fp32 op list); CPU
        # torch 2.1 has no fp16 norm kernels at all. Without autocast, the weights meet the input's dtype.
        dtype = torch.float32 if compat.autocast_dtype(x.device.type) else x.dtype
        weight = module.weight.to(dtype)
        bias = module.bias.to(dtype) if module.bias is not None else None
        if isinstance(module, nn.GroupNorm):
            return F.group_norm(x.to(dtype), module.num_groups, weight, bias, module.eps)
        return F.layer_norm(x.to(dtype), module.normalized_shape, weight, bias, module.eps)

    return forward
