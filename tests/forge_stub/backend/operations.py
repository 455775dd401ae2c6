"""Forge's layer classes (backend/operations.py, `ForgeOperations`), as the UNet holds them.

What an adapter has to respect: `Linear` is a plain `nn.Module`, NOT an `nn.Linear` subclass (it has
`in_features`, `out_features`, `weight`, `bias`); `Conv2d`, `GroupNorm` and `LayerNorm` are subclasses of torch's.
With `parameters_manual_cast` the weights are cast to the input's dtype and device on every call (Forge sets it when
the storage dtype differs from the computation dtype, and for modules its memory manager leaves in CPU memory).
Forge's online-LoRA path (`forge_online_loras`) and quantised layers are left out.
Ports backend/operations.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import contextlib

import torch
import torch.nn.functional as F


def weight_and_bias(layer, x):
    """The layer's weight and bias as its forward uses them: cast to the input's dtype and device when the layer
    casts manually, as they are otherwise."""
    weight, bias = layer.weight, layer.bias
    if layer.parameters_manual_cast:
        weight = weight.to(device=x.device, dtype=x.dtype)
        bias = bias.to(device=x.device, dtype=x.dtype) if bias is not None else None
    return weight, bias


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = False

        def _load_from_state_dict(self, state_dict, prefix, *args):
            """Forge creates the Parameters from the state dict (so inside the loader's inference mode)."""
            if prefix + "weight" in state_dict:
                self.weight = torch.nn.Parameter(state_dict[prefix + "weight"].clone())
            if prefix + "bias" in state_dict:
                self.bias = torch.nn.Parameter(state_dict[prefix + "bias"].clone())

        def forward(self, x):
            weight, bias = weight_and_bias(self, x)
            return F.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d):
        parameters_manual_cast = False

        def forward(self, x):
            weight, bias = weight_and_bias(self, x)
            return self._conv_forward(x, weight, bias)

    class GroupNorm(torch.nn.GroupNorm):
        parameters_manual_cast = False

        def forward(self, x):
            weight, bias = weight_and_bias(self, x)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    class LayerNorm(torch.nn.LayerNorm):
        parameters_manual_cast = False

        def forward(self, x):
            weight, bias = weight_and_bias(self, x)
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


@contextlib.contextmanager
def using_forge_operations():
    """torch.nn's layer classes replaced by Forge's while a model is built, as Forge builds every model."""
    names = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")
    saved = {name: getattr(torch.nn, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn, name, getattr(ForgeOperations, name))
        yield
    finally:
        for name, cls in saved.items():
            setattr(torch.nn, name, cls)
