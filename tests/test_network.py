"""The merged layer of every network type: one op with the merged weight (W + ΔW, or DoRA's rescaled
W + ΔW) whose backward rebuilds that weight instead of keeping it, checked against plain autograd on the same
expression for the layer kinds the types adapt, with and without autocast."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lohatrain.network import LayerPlan, Network

LAYERS = {
    "linear": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "conv3x3_stride2": (lambda: nn.Conv2d(8, 12, 3, padding=1, stride=2), (2, 8, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 5, 5)),
}
TYPES = [("lora", False), ("locon", False), ("loha", False), ("lokr", False), ("lora", True), ("loha", True)]


def plain_op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DoRA's W' = m · (W + ΔW) / ‖W + ΔW‖, the norm over all but the input channel (the WebUI's axis)."""
    merged = base + delta
    norms = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
    return scale * merged / norms.reshape(scale.shape)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("method,dora", TYPES, ids=[f"{m}{'+dora' if d else ''}" for m, d in TYPES])
def test_merged_layer_matches_autograd_on_the_merged_weight(method, dora, kind, autocast):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make().requires_grad_(False)
    network = Network([LayerPlan("k", layer, dim=2, alpha=2.0)], seed=1, method=method, factor=2, dora=dora)
    with torch.no_grad():
        for p in network.parameters():  # every type starts at ΔW = 0
            p.add_(torch.randn_like(p) * 0.3)
    trainable = list(network.parameters())
    x = torch.randn(shape)
    results = []
    for run in ("autograd", "merged layer"):
        for p in trainable:
            p.grad = None
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if run == "autograd":
                delta = network.adapters[0].delta()
                weight = (dora_weight(layer.weight, delta, network.dora_scales["0"]) if dora
                          else layer.weight + delta)
                out = plain_op(layer, inp, weight)
            else:
                network.attach()
                try:
                    out = layer(inp)
                finally:
                    network.detach()
        (out.float() ** 2).sum().backward()
        results.append((out, inp.grad, [p.grad.clone() for p in trainable]))
    (want, want_x, want_g), (got, got_x, got_g) = results
    def close(a, b):  # bf16 rounds each side differently: within 2% of the largest value there
        tol = dict(atol=0.02 * b.abs().max().item(), rtol=0.05) if autocast else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, b, **tol)

    assert got.dtype == want.dtype and got_x.dtype == x.dtype
    close(got, want)
    close(got_x, want_x)
    for g, w in zip(got_g, want_g):
        assert g.abs().max() > 0
        close(g, w)


@pytest.mark.parametrize("method", ["lora", "locon", "loha", "lokr"])
def test_every_type_starts_as_the_model(method):
    layer = nn.Conv2d(8, 12, 3)
    network = Network([LayerPlan("k", layer, dim=2, alpha=1.0)], seed=5, method=method, dora=method != "lokr")
    # a fresh network leaves the layer as it is (with DoRA, W rescaled by its own norms: rounding only)
    assert network.merged_delta(0, layer.weight).abs().max() < 1e-6
