"""What every network type provides to the wiring: its trainable parameters, ΔW and its file tensors."""
from __future__ import annotations

import torch
from torch import nn


class Adapter(nn.Module):
    """One adapted layer's trainable part for a base weight of `shape` (out, in[, kh, kw]).

    Initial values are drawn from torch's global RNG, which the network seeds (lohatrain.rng).
    """

    def __init__(self, shape: tuple[int, ...], dim: int, alpha: float, factor: int = -1):
        super().__init__()
        self.shape = tuple(shape)

    def delta(self) -> torch.Tensor:
        """ΔW in the base weight's shape (the file's scale included), float32 like the parameters."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """`<suffix>: tensor` as the WebUI and ComfyUI read this type (without the `<key>.` prefix)."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.file_tensors().values())
