"""The merged LoHa layer: one op with W + ΔW whose backward rebuilds W + ΔW instead of keeping it, checked
against plain autograd on the same expression for the layer kinds LoHa adapts, with and without autocast."""
from __future__ import annotations

import pytest
import torch
from lycoris.modules.loha import LohaModule
from torch import nn

from lohatrain.network import _merged_forward

LAYERS = {
    "linear": (lambda: nn.Linear(16, 24), (2, 5, 16)),
    "conv3x3_stride2": (lambda: nn.Conv2d(8, 12, 3, padding=1, stride=2), (2, 8, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(8, 12, 1), (2, 8, 5, 5)),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_merged_layer_matches_autograd_on_w_plus_delta(kind, autocast):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = make().requires_grad_(False)
    lora = LohaModule("k", layer, lora_dim=4, alpha=2)
    with torch.no_grad():
        lora.hada_w2_a.normal_(std=0.3)  # lycoris starts at ΔW = 0
    factors = [p for p in lora.parameters() if p.requires_grad]
    x = torch.randn(shape)
    results = []
    for run in ("autograd", "merged layer"):
        for p in factors:
            p.grad = None
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if run == "autograd":
                out = lora.op(inp, layer.weight + lora.get_weight(lora.shape), layer.bias, **lora.kw_dict)
            else:
                out = _merged_forward(layer, lora)(inp)
        (out.float() ** 2).sum().backward()
        results.append((out, inp.grad, [p.grad.clone() for p in factors]))
    (want, want_x, want_f), (got, got_x, got_f) = results
    tol = dict(atol=5e-2, rtol=5e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    assert got.dtype == want.dtype and got_x.dtype == x.dtype
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_x, want_x, **tol)
    for g, w in zip(got_f, want_f):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, **tol)
