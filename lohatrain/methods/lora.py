"""LoRA as kohya's sd-scripts write it: ΔW = up · down · alpha/dim (LoCon, locon.py, is the same on 3x3 convs).

A Linear's down is (dim, in) and up (out, dim); a conv's down is a conv of the layer's own kernel
(dim, in, kh, kw) and its up a 1x1 conv (out, dim, 1, 1), the layout the WebUI's network_lora.py and ComfyUI
rebuild. Initial values as kohya and LyCORIS: down Kaiming-uniform, up zero (the network starts as the model).
"""
from __future__ import annotations

import math

import torch
from lycoris.functional import locon
from torch import nn

from .base import Adapter, NetworkType, Preset, by_family


class LoRA(Adapter):
    def __init__(self, shape, dim, alpha, factor=-1):
        super().__init__(shape, dim, alpha)
        out_dim, in_dim, *kernel = shape
        self.down = nn.Parameter(torch.empty(dim, in_dim, *kernel))
        self.up = nn.Parameter(torch.zeros(out_dim, dim, *(1 for _ in kernel)))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = alpha / dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def delta(self):
        return locon.diff_weight(self.down, self.up, None, gamma=self.scale)

    def file_tensors(self):
        return {"lora_down.weight": self.down, "lora_up.weight": self.up, "alpha": self.alpha}


def _problems(settings) -> list[str]:
    if settings.conv_dim > 0:
        return ["conv_dim: plain LoRA adapts no 3x3 convolutions; choose locon to train them, or set conv_dim to 0"]
    return []


# Rank 8-64 on SD1, kohya's usual range (a LoRA needs twice LoHa's rank for the same expressiveness, LyCORIS'
# guidelines compare them at equal file size), half on SDXL. 1e-4 is kohya sd-scripts' usual LoRA rate.
LORA = NetworkType(
    name="lora", label="LoRA",
    summary="The most widely shared format: fidelity in small files (attention layers only)",
    adapter=LoRA, suffixes=("lora_down.weight", "lora_up.weight"), file_kind="LoRA/LoCon",
    dora=True, convolutions=False, learning_rate=1e-4, kohya_module="networks.lora", problems=_problems,
    presets=by_family({
        "small": Preset("Small: fast, faces and simple objects", 8, 4, 0, 0, 6.8),
        "medium": Preset("Medium: characters", 16, 8, 0, 0, 13.6),
        "high": Preset("High: characters with details, styles", 32, 16, 0, 0, 27.1),
        "highest": Preset("Highest quality: styles and complex concepts", 64, 32, 0, 0, 54.3),
    }, {
        "small": Preset("Small: fast, faces and simple objects", 4, 2, 0, 0, 21.3),
        "medium": Preset("Medium: characters", 8, 4, 0, 0, 42.6),
        "high": Preset("High: characters with details, styles", 16, 8, 0, 0, 85.1),
        "highest": Preset("Highest quality: styles and complex concepts", 32, 16, 0, 0, 170.2),
    }))
