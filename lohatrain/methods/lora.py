"""LoRA and LoCon as kohya's sd-scripts write them: ΔW = up · down · alpha/dim.

A Linear's down is (dim, in) and up (out, dim); a conv's down is a conv of the layer's own kernel
(dim, in, kh, kw) and its up a 1x1 conv (out, dim, 1, 1), the layout the WebUI's network_lora.py and ComfyUI
rebuild. Initial values as kohya and LyCORIS: down Kaiming-uniform, up zero (the network starts as the model).
"""
from __future__ import annotations

import math

import torch
from lycoris.functional import locon
from torch import nn

from .base import Adapter


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
