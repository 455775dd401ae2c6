"""LoKr: ΔW = w1 ⊗ w2, the Kronecker product of a small w1 (a, c) and a larger w2 (b, d[, kh, kw]), with
out = a·b and in = c·d split by lycoris' `factorization` (`lokr_factor`, -1: as square as possible).

A Linear's w2 is stored low-rank, `lokr_w2_a` (b, dim) · `lokr_w2_b` (dim, d) scaled by alpha/dim, when dim is
under half of max(b, d) (LyCORIS' rule), else whole (`lokr_w2`, scale 1). A conv's w2 is always whole
(b, d, kh, kw): the WebUI (network_lokr.py) and ComfyUI rebuild a low-rank conv w2 in different layouts, so
only the whole form reaches both the same. Initial values as LyCORIS: w1 and w2_a Kaiming-uniform, w2 or
w2_b zero."""
from __future__ import annotations

import math

import torch
from lycoris.functional import lokr
from lycoris.functional.general import factorization
from torch import nn

from .base import Adapter, NetworkType, Preset, by_family


class LoKr(Adapter):
    def __init__(self, shape, dim, alpha, factor=-1):
        super().__init__(shape, dim, alpha)
        out_dim, in_dim, *kernel = shape
        a, b = factorization(out_dim, factor)
        c, d = factorization(in_dim, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.low_rank = not kernel and dim < max(b, d) / 2
        if self.low_rank:
            self.lokr_w2_a = nn.Parameter(torch.empty(b, dim))
            self.lokr_w2_b = nn.Parameter(torch.zeros(dim, d))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            self.gamma = float(alpha)  # lycoris' diff_weight divides it by the rank: alpha/dim
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(b, d, *kernel))
            alpha = dim  # a whole w2 has no rank: the loaders apply it unscaled, and so does alpha/dim = 1
            self.gamma = 1.0
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def delta(self):
        if self.low_rank:
            return lokr.diff_weight(self.lokr_w1, None, None, None, self.lokr_w2_a, self.lokr_w2_b, None,
                                    gamma=self.gamma)
        return lokr.diff_weight(self.lokr_w1, None, None, self.lokr_w2, None, None, None, gamma=self.gamma)

    def file_tensors(self):
        w2 = ({"lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b} if self.low_rank
              else {"lokr_w2": self.lokr_w2})
        return {"lokr_w1": self.lokr_w1, **w2, "alpha": self.alpha}


def _problems(settings) -> list[str]:
    return ["dora: DoRA applies to lora, locon and loha here, not lokr"] if settings.dora else []


# Its size is set by its factor (LyCORIS' guidelines: full dimension, factor 4-8 for fidelity, higher for small
# files): dim 10000 keeps every w2 whole, and conv_dim only switches the convolutions on. LoHa's rate.
LOKR = NetworkType(
    name="lokr", label="LoKr",
    summary="The smallest files (a few MB at factor 16), or high fidelity at factor 4 to 8",
    adapter=LoKr, suffixes=("lokr_w1",), file_kind="LoKr",
    dora=False, convolutions=True, learning_rate=1e-3, max_dim=100_000, sized_by_factor=True,
    network_args=lambda settings: {"factor": str(settings.lokr_factor)}, problems=_problems,
    presets=by_family({
        "small": Preset("Small: factor 16, the smallest files", 10000, 1, 0, 0, 2.2, 16),
        "medium": Preset("Medium: factor 8, characters", 10000, 1, 0, 0, 8.4, 8),
        "high": Preset("High: factor 8 with convolutions, styles", 10000, 1, 1, 1, 26.8, 8),
        "highest": Preset("Highest fidelity: factor 4", 10000, 1, 0, 0, 33.4, 4),
    }, {
        "small": Preset("Small: factor 16, the smallest files", 10000, 1, 0, 0, 17.6, 16),
        "medium": Preset("Medium: factor 8, characters", 10000, 1, 0, 0, 69.1, 8),
        "high": Preset("High: factor 8 with convolutions, styles", 10000, 1, 1, 1, 80.1, 8),
        "highest": Preset("Highest fidelity: factor 4", 10000, 1, 0, 0, 276.0, 4),
    }))
