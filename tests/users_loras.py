"""LoRA files as a user has them from elsewhere (kohya's key names), to put in a host's Lora folder before a run:
the run must train on the checkpoint alone, whatever the last generation applied."""
from __future__ import annotations

import torch
from torch import nn


def text_encoder_lora(transformer: nn.Module, seed: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on the query projection of every layer of a transformers CLIP (`lora_te_…` keys), strong enough to
    change what every caption encodes to."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(transformer.text_model.encoder.layers):
        weight = layer.self_attn.q_proj.weight
        key = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        tensors[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=gen)
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=gen)
    return tensors
