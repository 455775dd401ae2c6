"""Attention through torch's `scaled_dot_product_attention`, as the WebUI runs it by default.

ldm's own attention (`CrossAttention` in the UNet, `AttnBlock` in the VAE) builds the whole attention matrix
with einsum/bmm: at 1024 px that is gigabytes per layer and several times slower than torch's fused kernel,
which the WebUI's default cross-attention optimization ("sdp") uses instead. A model loaded by the command line
gets the same: an instance forward on each attention module of that model only (no class is patched, so
nothing leaks into other models), the same maths as ldm's (tested against it within float tolerance).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from . import ldm_importable  # noqa: F401  (first: makes ldm importable)
from ldm.modules.attention import CrossAttention, MemoryEfficientCrossAttention  # noqa: E402
from ldm.modules.diffusionmodules.model import AttnBlock  # noqa: E402


def use_sdpa(model: nn.Module) -> int:
    """Route every ldm attention module of `model` through SDPA; returns how many were routed."""
    routed = 0
    for module in model.modules():
        if isinstance(module, (CrossAttention, MemoryEfficientCrossAttention)):
            module.forward = _cross_attention(module)
        elif isinstance(module, AttnBlock):
            module.forward = _vae_attention(module)
        else:
            continue
        routed += 1
    return routed


def _cross_attention(attn: nn.Module):
    def forward(x, context=None, mask=None):
        context = x if context is None else context
        batch, heads = x.shape[0], attn.heads
        q, k, v = (t.view(batch, t.shape[1], heads, -1).transpose(1, 2)
                   for t in (attn.to_q(x), attn.to_k(context), attn.to_v(context)))
        if mask is not None:  # ldm's mask: True where a context token may be attended to
            mask = mask.reshape(batch, 1, 1, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.to_out(out.transpose(1, 2).reshape(batch, x.shape[1], -1))

    return forward


def _vae_attention(block: nn.Module):
    """One head over the pixels, channels as the head width: (b, c, h, w) → (b, 1, h·w, c)."""
    def forward(x):
        h = block.norm(x)
        b, c, height, width = x.shape
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3) for t in (block.q(h), block.k(h), block.v(h)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(b, c, height, width)
        return x + block.proj_out(out)

    return forward
