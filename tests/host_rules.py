"""An independent reading of how the WebUI's Lora extension (v1.10.1, extensions-builtin/Lora/networks.py)
finds the module for a key and applies a LoRA/LoCon, LoHa or LoKr, with or without DoRA, used to check our
files from the loader's side. The ΔW formulas are the published ones (LoRA, LoHa/FedPara, LoKr's Kronecker
product, DoRA's W' = m · (W + ΔW) / ‖W + ΔW‖ with the norm per input channel, the axis the WebUI uses).

Written from the host's rules, not from lohatrain's code: diffusers names are converted to ldm names
(assuming SD1's 2 res blocks per level; conv_in, conv_out and the time embedding's two Linears by name), then
looked up among `model.model` and the text encoder's modules with dots turned into underscores; an ldm-named UNet
key matches by the `lora_unet` → `diffusion_model` fallback.

SD2 (the host decides it by a `model_transformer_resblocks` entry in that module map, i.e. an OpenCLIP text
encoder): `lora_te_…_layers_N_<rest>` becomes `model_transformer_resblocks_N_<rest>` with `self_attn` →
`attn`, `mlp_fc1` → `mlp_c_fc`, `mlp_fc2` → `mlp_c_proj`. A name ending in `_q_proj`/`_k_proj`/`_v_proj`
that is not a module falls back to the module named by the rest (the fused `nn.MultiheadAttention`), and
`…_attn_out_proj` is the attention's `out_proj` Linear. The host changes weights only in layers whose
forward runs: the attention (never its `out_proj`, whose weight the attention reads directly) takes q, k, v
into the thirds of `in_proj_weight` and out into `out_proj.weight`, and only when all four are present.

SDXL: UNet keys in the ldm naming only (the `lora_unet` fallback); `lora_te1_text_model_…` lands on CLIP-L
(`0_transformer_text_model_…`) and `lora_te2_text_model_encoder_layers_N_…` on OpenCLIP-bigG
(`1_model_transformer_resblocks_N_…`, with the same renaming and fused-attention rule as SD2's).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def diffusers_to_compvis(key: str, is_sd2: bool = False) -> str:
    """The host's conversion of a kohya SD1/SD2 key (without the `.hada_*` part) to its module-map name."""
    outside = {"lora_unet_conv_in": "diffusion_model_input_blocks_0_0", "lora_unet_conv_out": "diffusion_model_out_2",
               "lora_unet_time_embedding_linear_1": "diffusion_model_time_embed_0",
               "lora_unet_time_embedding_linear_2": "diffusion_model_time_embed_2"}
    if key in outside:
        return outside[key]
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
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):  # SDXL's OpenCLIP-bigG
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def module_map(model) -> dict[str, nn.Module]:
    """The host's `network_layer_mapping`: text encoder (inside `.wrapped` if any) and `model.model`.

    SDXL (a model with a `conditioner`): each text embedder's modules prefixed by its index, `0_…` (CLIP-L) and
    `1_…` (OpenCLIP-bigG); in the host they sit in wrappers as `.wrapped`, which a bare embedder stands for.
    """
    mapping = {}
    if hasattr(model, "conditioner"):
        for i, embedder in enumerate(model.conditioner.embedders):
            if getattr(embedder, "input_key", None) == "txt":
                for name, module in getattr(embedder, "wrapped", embedder).named_modules():
                    mapping[f"{i}_{name.replace('.', '_')}"] = module
    else:
        stage = model.cond_stage_model
        for name, module in getattr(stage, "wrapped", stage).named_modules():
            mapping[name.replace(".", "_")] = module
    for name, module in model.model.named_modules():
        mapping[name.replace(".", "_")] = module
    return mapping


def is_sd2(mapping: dict[str, nn.Module]) -> bool:
    return "model_transformer_resblocks" in mapping


def resolve(mapping: dict[str, nn.Module], key: str) -> tuple[str, nn.Module | None]:
    """(the host's name for the key, the module it lands on or None)."""
    name = diffusers_to_compvis(key, is_sd2(mapping))
    module = mapping.get(name)
    if module is None and (m := re.fullmatch(r"(.*)_[qkv]_proj", name)):
        module = mapping.get(m[1])
    if module is None and "lora_unet" in key:
        name = key.replace("lora_unet", "diffusion_model")
        module = mapping.get(name)
    elif module is None and "lora_te1_text_model" in key:
        for prefix in ("0_transformer_text_model", "transformer_text_model"):
            name = key.replace("lora_te1_text_model", prefix)
            module = mapping.get(name)
            if module is not None:
                break
    return name, module


def find_module(model, key: str) -> nn.Module | None:
    return resolve(module_map(model), key)[1]


def group_keys(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in tensors.items():
        layer, _, part = key.partition(".")
        groups[layer][part] = value
    return dict(groups)


def delta(w: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """What the layer's weight changes by at multiplier 1, from the file's tensors for that layer."""
    shape = weight.shape
    if "lora_down.weight" in w:  # LoRA / LoCon: up · down · alpha / r
        down, up = w["lora_down.weight"].double(), w["lora_up.weight"].double()
        r = down.shape[0]
        d = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape) * _alpha(w, r) / r
    elif "hada_w1_a" in w:  # LoHa: (w1a·w1b) ⊙ (w2a·w2b) · alpha / r
        w1a, w1b, w2a, w2b = (w[k].double() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        r = w1b.shape[0]
        d = ((w1a @ w1b) * (w2a @ w2b)).reshape(shape) * _alpha(w, r) / r
    else:  # LoKr: w1 ⊗ w2, · alpha / r only when a factor is stored as a product of rank r
        w1 = w["lokr_w1"].double() if "lokr_w1" in w else w["lokr_w1_a"].double() @ w["lokr_w1_b"].double()
        w2 = w["lokr_w2"].double() if "lokr_w2" in w else w["lokr_w2_a"].double() @ w["lokr_w2_b"].double()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2).reshape(shape)
        rank = next((w[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in w), None)
        if rank is not None:
            d = d * _alpha(w, rank) / rank
    if "dora_scale" in w:
        base = weight.double()
        merged = base + d
        norms = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
        norms = norms.reshape(1, shape[1], *[1] * (len(shape) - 2))
        d = w["dora_scale"].double().reshape(norms.shape) * merged / norms - base
    return d


def _alpha(w: dict[str, torch.Tensor], rank: int) -> float:
    return w["alpha"].double().item() if "alpha" in w else rank


def _attention_out_projs(mapping: dict[str, nn.Module]) -> set[int]:
    return {id(m.out_proj) for m in mapping.values() if isinstance(m, nn.MultiheadAttention)}


@torch.no_grad()
def apply_file(model, tensors: dict[str, torch.Tensor], multiplier: float = 1.0) -> list[str]:
    """Apply every network layer in `tensors` to `model`'s weights in place, as the host does; returns unmatched
    keys."""
    mapping = module_map(model)
    loaded: dict[str, dict[str, torch.Tensor]] = {}  # the host's name → the LoHa's tensors
    unmatched = []
    for layer, w in group_keys(tensors).items():
        name, module = resolve(mapping, layer)
        if module is None:
            unmatched.append(layer)
        else:
            loaded[name] = w
    inert = _attention_out_projs(mapping)
    for name, module in mapping.items():  # each layer whose forward runs applies what is named after it
        if isinstance(module, nn.MultiheadAttention):
            parts = [loaded.get(f"{name}_{p}_proj") for p in ("q", "k", "v", "out")]
            if all(w is not None for w in parts):
                e = module.embed_dim
                thirds = module.in_proj_weight.split(e)
                delta_in = torch.cat([delta(w, third) for w, third in zip(parts[:3], thirds)])
                module.in_proj_weight += (delta_in * multiplier).to(module.in_proj_weight.dtype)
                delta_out = delta(parts[3], module.out_proj.weight) * multiplier
                module.out_proj.weight += delta_out.to(module.out_proj.weight.dtype)
        elif name in loaded and hasattr(module, "weight") and id(module) not in inert:
            change = delta(loaded[name], module.weight) * multiplier
            module.weight += change.to(module.weight.dtype)
    return unmatched
