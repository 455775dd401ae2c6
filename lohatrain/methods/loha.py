"""LoHa: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha/dim (`hada_*` keys; a conv's b factors flattened to
(dim, in·kh·kw), the 2-D form ComfyUI needs). Initial values as lycoris-lora's LohaModule: w1_b and w2_b
normal(1), w1_a normal(0.1), w2_a zero."""
from __future__ import annotations

import math

import torch
from lycoris.functional import loha
from torch import nn

from .base import Adapter


class LoHa(Adapter):
    def __init__(self, shape, dim, alpha, factor=-1):
        super().__init__(shape, dim, alpha)
        out_dim, fan_in = shape[0], math.prod(shape[1:])
        self.hada_w1_a = nn.Parameter(torch.empty(out_dim, dim))
        self.hada_w1_b = nn.Parameter(torch.empty(dim, fan_in))
        self.hada_w2_a = nn.Parameter(torch.zeros(out_dim, dim))
        self.hada_w2_b = nn.Parameter(torch.empty(dim, fan_in))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        self.scale = alpha / dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def delta(self):
        # lycoris' HadaWeight saves its scale for backward: it must be a tensor
        gamma = torch.tensor(self.scale, dtype=self.hada_w1_b.dtype, device=self.hada_w1_b.device)
        flat = loha.diff_weight(self.hada_w1_b, self.hada_w1_a, self.hada_w2_b, self.hada_w2_a, None, None,
                                gamma=gamma)
        return flat.reshape(self.shape)

    def file_tensors(self):
        return {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a,
                "hada_w2_b": self.hada_w2_b, "alpha": self.alpha}
