"""LoHa: ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha/dim (`hada_*` keys; a conv's b factors flattened to
(dim, in·kh·kw), the 2-D form ComfyUI needs). Initial values as lycoris-lora's LohaModule: w1_b and w2_b
normal(1), w1_a normal(0.1), w2_a zero."""
from __future__ import annotations

import math

import torch
from lycoris.functional import loha
from torch import nn

from .base import Adapter, NetworkType, Preset, by_family


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


# "highest" is the original product's recommendation and the default. SDXL's presets use half SD1's ranks (SD1's
# would give 180-360 MB files). LoHa keeps the original product's learning rate, 1e-3 (LyCORIS' own types train
# at about ten times LoRA's rate).
LOHA = NetworkType(
    name="loha", label="LoHa",
    summary="Flexible characters that change style easily; more detail per megabyte than LoRA",
    adapter=LoHa, suffixes=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), file_kind="LoHa",
    dora=True, convolutions=True, learning_rate=1e-3,
    presets=by_family({
        "small": Preset("Small: fast, faces and simple objects", 4, 2, 0, 0, 6.8),
        "medium": Preset("Medium: characters", 8, 4, 0, 0, 13.6),
        "high": Preset("High: characters with details, styles", 16, 8, 4, 2, 41.1),
        "highest": Preset("Highest quality: styles and complex concepts", 32, 16, 8, 4, 82.3),
    }, {
        "small": Preset("Small: fast, faces and simple objects", 4, 2, 0, 0, 42.6),
        "medium": Preset("Medium: characters", 8, 4, 0, 0, 85.1),
        "high": Preset("High: characters with details, styles", 8, 4, 4, 2, 92.7),
        "highest": Preset("Highest quality: styles and complex concepts", 16, 8, 8, 4, 185.4),
    }))
