"""An independent reading of how the WebUI's Lora extension (v1.10.1, extensions-builtin/Lora/networks.py)
finds the module for a key and applies a LoHa, used to check our files from the loader's side.

Written from the host's rules, not from lohatrain's code: diffusers names are converted to ldm names
(assuming SD1's 2 res blocks per level), then looked up among `model.model` and the text encoder's modules
with dots turned into underscores; an ldm-named UNet key matches by the `lora_unet` → `diffusion_model`
fallback.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def diffusers_to_compvis(key: str) -> str:
    """The host's conversion of a kohya SD1 key (without the `.hada_*` part) to its module-map name."""
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        level, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + 3 * level + i}_{int(kind == 'attentions')}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m[1], int(m[2]), m[3]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else 2 * i}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        level, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = _RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{3 * level + i}_{int(kind == 'attentions')}_{rest}"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        level = int(m[1])
        return f"diffusion_model_output_blocks_{2 + 3 * level}_{2 if level > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def module_map(model) -> dict[str, nn.Module]:
    """The host's `network_layer_mapping`: text encoder (inside `.wrapped` if any) and `model.model`."""
    mapping = {}
    stage = model.cond_stage_model
    for name, module in getattr(stage, "wrapped", stage).named_modules():
        mapping[name.replace(".", "_")] = module
    for name, module in model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


def find_module(model, key: str) -> nn.Module | None:
    mapping = module_map(model)
    module = mapping.get(diffusers_to_compvis(key))
    if module is None and "lora_unet" in key:
        module = mapping.get(key.replace("lora_unet", "diffusion_model"))
    return module


def group_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        layer, _, part = key.partition(".")
        groups[layer][part] = value
    return dict(groups)


def loha_delta(w: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / r, r = rows of w1_b, in the layer's weight shape."""
    w1a, w1b, w2a, w2b = (w[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    r = w1b.shape[0]
    alpha = w["alpha"].double().item() if "alpha" in w else r
    return ((w1a @ w1b) * (w2a @ w2b) * alpha / r).reshape(shape)


@torch.no_grad()
def apply_file(model, tensors: dict[str, torch.Tensor], multiplier: float = 1.0) -> list[str]:
    """Add every LoHa in `tensors` to `model`'s weights in place, as the host does; returns unmatched keys."""
    unmatched = []
    for layer, w in group_keys(tensors).items():
        module = find_module(model, layer)
        if module is None:
            unmatched.append(layer)
            continue
        delta = loha_delta(w, module.weight.shape) * multiplier
        module.weight += delta.to(module.weight.dtype)
    return unmatched
