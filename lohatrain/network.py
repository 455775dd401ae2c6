"""The network: one adapter per chosen layer (its type from lohatrain.methods), applied the way the WebUI
applies the file.

Which layers: Linear and 1x1 convs inside the UNet's attention blocks; with `conv_dim > 0` (LoCon, LoHa, LoKr)
also the layers of ResBlocks and down/up-samplers (3x3 convs get conv_dim/conv_alpha, the rest dim/alpha);
with a text-encoder learning rate, the CLIP attention and MLP Linears.

A fused `nn.MultiheadAttention` (OpenCLIP: SD2's text encoder, SDXL's second) gets four adapters, one per
projection, keyed `<prefix>_q_proj`, `_k_proj`, `_v_proj`, `_out_proj` as the WebUI expects them: q, k and v
change the thirds of `in_proj_weight`, out changes `out_proj.weight`, and the attention runs once with the
merged weights (torch's own `multi_head_attention_forward`), as the WebUI applies the file.

How a layer runs while training: lycoris-lora's own modules run the base op and then a second full-size op
with ΔW, 1.5x the FLOPs of a step (counted in benchmarks/engine.py). We take only the maths (each type's ΔW,
and DoRA's rescaling from `lycoris.functional`) and do one op with the merged weight, which is also exactly
how the WebUI applies the file at inference. For backward a layer keeps its input, not the full-size merged
weight, and rebuilds that there (`_MergedLayer`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lycoris.functional.general import apply_dora_scale
from torch import nn

from . import compat
from .errors import LohatrainError
from .methods import TYPES, Adapter
from .parts import ModelParts
from .precision import merge
from .rng import seeded_global_rng
from .targets import ATTENTION_LAYER, DEFAULT_TARGETS, TEXT_MLP_KEY


# The projections of a fused attention, in the order of `in_proj_weight`'s rows (then out_proj).
FUSED_PARTS = ("q", "k", "v", "out")


@dataclass(frozen=True)
class LayerPlan:
    """One layer to adapt: its key in the file, the module, and the LoHa size for it.

    For one projection of a fused attention, `fused` is the `nn.MultiheadAttention`, `part` one of
    FUSED_PARTS, and `module` a weightless `nn.Linear` on the meta device with the projection's shape (the
    LoHa takes its shape from it; the forward reads the live weights from `fused`).
    """

    key: str
    module: nn.Module
    dim: int
    alpha: float
    text_encoder: bool = False
    fused: nn.MultiheadAttention | None = None
    part: str = ""
    linear: bool | None = None  # a Linear layer (torch's or a host's own class); unless said, any but a Conv2d
    lr_block: tuple[str, int] | None = None  # the UNet block whose learning-rate weight it takes (lohatrain.targets)

    def __post_init__(self):
        if self.linear is None:
            object.__setattr__(self, "linear", not isinstance(self.module, nn.Conv2d))


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def plan_unet(family, unet: nn.Module, dim: int, alpha: float, conv_dim: int, conv_alpha: float,
              linear_types: tuple[type, ...] = (nn.Linear,), targets: str = DEFAULT_TARGETS) -> list[LayerPlan]:
    """The UNet layers of a target set (lohatrain.targets) to adapt, in module order, named by the family's key rule;
    `linear_types`: what counts as a Linear layer (a host may have its own class, ModelParts.linear_types)."""
    with_convs = conv_dim > 0 or targets == "full"
    block_types = family.attention_blocks + (family.conv_blocks if with_convs and targets != "attn-only" else ())
    outer = family.outer_layers if targets == "full" else ()
    plans, seen = [], set()
    for block_path, block in unet.named_modules():
        if type(block).__name__ in block_types:
            inside = block.named_modules()
        elif block_path in outer:
            inside = [("", block)]
        else:
            continue
        for child_path, module in inside:
            path = f"{block_path}.{child_path}" if child_path else block_path
            linear = isinstance(module, linear_types)
            if path in seen or not (linear or isinstance(module, nn.Conv2d)):
                continue
            if targets == "attn-only" and not ATTENTION_LAYER.search(child_path):
                continue
            seen.add(path)
            key, lr_block = family.unet_key(unet, path), family.lr_block(path)
            if _is_3x3(module):
                if type(block).__name__ in family.attention_blocks or conv_dim <= 0:
                    continue
                plans.append(LayerPlan(key, module, conv_dim, conv_alpha, linear=False, lr_block=lr_block))
            else:
                plans.append(LayerPlan(key, module, dim, alpha, linear=linear, lr_block=lr_block))
    return plans


def plan_text_encoder(parts: ModelParts, dim: int, alpha: float, targets: str = DEFAULT_TARGETS) -> list[LayerPlan]:
    """The family's text-encoder layers (without the MLP for "attn-only"); a fused attention among them becomes its
    four projections."""
    plans = []
    for key, module in parts.text_layers():
        if targets == "attn-only" and TEXT_MLP_KEY.search(key):
            continue
        if isinstance(module, nn.MultiheadAttention):
            plans += plan_fused_attention(key, module, dim, alpha, text_encoder=True)
        else:
            plans.append(LayerPlan(key, module, dim, alpha, text_encoder=True))
    return plans


def plan_fused_attention(key: str, attention: nn.MultiheadAttention, dim: int, alpha: float,
                         text_encoder: bool = False) -> list[LayerPlan]:
    """Four plans, `<key>_{q,k,v,out}_proj`, for an attention with a fused (E, E) x 3 `in_proj_weight`."""
    if not attention._qkv_same_embed_dim or attention.in_proj_weight is None:
        raise ValueError(f"{key}: only a fused nn.MultiheadAttention (one in_proj_weight) can be adapted")
    e = attention.embed_dim
    # Shapes only: the meta device holds no data, so nothing of the base weights is copied.
    return [LayerPlan(f"{key}_{part}_proj", nn.Linear(e, e, bias=False, device="meta"), dim, alpha,
                      text_encoder, fused=attention, part=part) for part in FUSED_PARTS]


def count_parameters(plans: list[LayerPlan], method: str = "loha", factor: int = -1, dora: bool = False) -> int:
    """The numbers a file of these layers holds (alpha and DoRA's scales included), counted on the meta device."""
    with torch.device("meta"):
        return Network(plans, seed=0, method=method, factor=factor, dora=dora).tensor_count()


class Network(nn.Module):
    """The trainable adapters, kept apart from the model: attach() hooks them in, detach() undoes it.

    With `dora`, each Linear/Conv layer also gets DoRA's `dora_scale`, one magnitude per input channel (shape
    (1, in, 1…), the axis the WebUI's network.py normalises over; ComfyUI reads both axes), starting at the
    base weight's own column norms. A fused attention's projections take no DoRA: the WebUI cannot apply it
    there (it would normalise the whole in_proj_weight), so they are written without it.
    """

    def __init__(self, plans: list[LayerPlan], seed: int, method: str = "loha", factor: int = -1,
                 dora: bool = False):
        super().__init__()
        self.plans = plans
        self.method = method
        self.adapters = nn.ModuleList()
        self.dora_scales = nn.ParameterDict()
        with seeded_global_rng(seed):  # the same seed always gives the same start
            for index, plan in enumerate(plans):
                shape = tuple(plan.module.weight.shape)
                self.adapters.append(TYPES[method].adapter(shape, plan.dim, plan.alpha, factor))
                if dora and plan.fused is None:
                    self.dora_scales[str(index)] = nn.Parameter(_column_norms(plan.module.weight))
        self.float()
        self._attached: list[tuple[nn.Module, object]] = []

    def parameters_of(self, text_encoder: bool) -> list[nn.Parameter]:
        return [p for index, plan in enumerate(self.plans) if plan.text_encoder == text_encoder
                for p in self._parameters_of(index)]

    def parameters_by_block(self) -> dict[tuple[str, int] | None, list[nn.Parameter]]:
        """The UNet adapters' parameters by the block whose learning-rate weight they take, in plan order."""
        blocks: dict[tuple[str, int] | None, list[nn.Parameter]] = {}
        for index, plan in enumerate(self.plans):
            if not plan.text_encoder:
                blocks.setdefault(plan.lr_block, []).extend(self._parameters_of(index))
        return blocks

    def _parameters_of(self, index: int) -> list[nn.Parameter]:
        scale = self.dora_scales.get(str(index))
        return [*self.adapters[index].parameters(), *([scale] if scale is not None else [])]

    def merged_delta(self, index: int, weight: torch.Tensor) -> torch.Tensor:
        """What the layer's weight changes by, in float32: ΔW, or with DoRA, DoRA(W + ΔW) − W."""
        delta = self.adapters[index].delta()
        scale = self.dora_scales.get(str(index))
        if scale is None:
            return delta
        base = weight.float()
        return apply_dora_scale(base, delta, scale, 1.0) - base

    def attach(self) -> None:
        """Route each adapted layer's forward through its adapter (an instance attribute, removed by detach).

        A fused attention runs merged with all four projections, the only way the WebUI applies it.
        """
        fused: dict[int, tuple[nn.MultiheadAttention, dict[str, Adapter]]] = {}
        for index, (plan, adapter) in enumerate(zip(self.plans, self.adapters)):
            if plan.fused is not None:
                fused.setdefault(id(plan.fused), (plan.fused, {}))[1][plan.part] = adapter
                continue
            self._route(plan.module, _merged_forward(plan.module, self, index))
        for attention, parts in fused.values():
            if sorted(parts) != sorted(FUSED_PARTS):
                raise ValueError(f"a fused attention needs adapters on all of {FUSED_PARTS}, not {sorted(parts)}: "
                                 "the WebUI ignores a partial set")
            self._route(attention, _merged_attention_forward(attention, parts))

    def _route(self, module: nn.Module, forward) -> None:
        self._attached.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def detach(self) -> None:
        for module, previous in reversed(self._attached):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._attached.clear()

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`<key>.<suffix>` for every adapter (its type's keys, `dora_scale` with DoRA), contiguous on the CPU in
        the save dtype (alpha too, as kohya)."""
        tensors = {}
        for index, (plan, adapter) in enumerate(zip(self.plans, self.adapters)):
            named = dict(adapter.file_tensors())
            if str(index) in self.dora_scales:
                named["dora_scale"] = self.dora_scales[str(index)]
            for name, value in named.items():
                tensors[f"{plan.key}.{name}"] = value.detach().to("cpu", dtype).contiguous()
        return tensors

    def load_file_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Start from a file of this network's own type, layers and sizes (to train it further); another type,
        rank or model family is refused, naming the mismatch."""
        own = self.file_tensors(torch.float32)
        problem = _file_mismatch(own, tensors)
        if problem:
            raise LohatrainError(f"{source} cannot be trained further with these settings: {problem}")
        with torch.no_grad():
            for index, (plan, adapter) in enumerate(zip(self.plans, self.adapters)):
                named = dict(adapter.file_tensors())
                if str(index) in self.dora_scales:
                    named["dora_scale"] = self.dora_scales[str(index)]
                for name, value in named.items():
                    if name != "alpha":
                        value.copy_(tensors[f"{plan.key}.{name}"])

    def tensor_count(self) -> int:
        return sum(t.numel() for a in self.adapters for t in a.file_tensors().values()) + sum(
            p.numel() for p in self.dora_scales.values())


def _file_mismatch(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str | None:
    def kind(tensors):
        suffixes = {k.split(".", 1)[1] for k in tensors}
        types = sorted({t.file_kind for t in TYPES.values() if suffixes.issuperset(t.suffixes)})
        return " + ".join(types) or "an unknown type", "dora_scale" in suffixes

    (own_type, own_dora), (their_type, their_dora) = kind(own), kind(theirs)
    if own_type != their_type:
        return f"it is a {their_type} file, these settings train {own_type}"
    if own_dora != their_dora:
        return "it was trained with DoRA and these settings have it off" if their_dora else (
            "it was trained without DoRA and these settings have it on")
    own_layers, their_layers = {k.split(".", 1)[0] for k in own}, {k.split(".", 1)[0] for k in theirs}
    if not own_layers & their_layers:
        return "its layers belong to another model family than the loaded model's"
    if own_layers != their_layers:
        return (f"it adapts {len(their_layers)} layers, these settings {len(own_layers)} (the convolution size, "
                "conv_dim, the text-encoder learning rate or the network targets differ)")
    for key, value in own.items():
        if theirs[key].shape != value.shape:
            return (f"its sizes differ ({key} is {tuple(theirs[key].shape)}, these settings make "
                    f"{tuple(value.shape)}): choose the preset or dim it was trained with")
        if key.endswith(".alpha") and float(theirs[key]) != float(value):
            return f"its alpha is {float(theirs[key]):g}, these settings have {float(value):g}"
    return None


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ over every axis but the input channel: shape (1, in, 1…), as the WebUI applies `dora_scale`."""
    w = weight.detach().float()
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))


def _merged_forward(module: nn.Module, network: Network, index: int):
    def forward(x):
        return _MergedLayer.apply(x, network.merged_delta(index, module.weight), module, network, index)

    return forward


def _linear(network: Network, index: int) -> bool:
    return network.plans[index].linear


class _MergedLayer(torch.autograd.Function):
    """`op(x, W + ΔW)` for a Linear or Conv2d that keeps only x for backward, not the full-size W + ΔW, which
    autograd would hold for every adapted layer from forward to backward (SDXL's deepest block alone: ~0.7 GB
    in fp16, benchmarks/sdxl.py). Backward rebuilds W + ΔW from the LoHa (one more ΔW: two rank-r matmuls per
    layer) and returns ∂loss/∂ΔW, which lycoris' own ΔW graph (it keeps only the factors) takes to them.

    Autocast is honoured by hand (custom functions are not autocast): the op runs in the autocast dtype, as
    autocast runs linear and conv, and the gradient of x comes back in x's own dtype. A host Linear's output is
    never a view, so its caller may add into it in place."""

    @staticmethod
    def forward(ctx, x, delta, module, network, index):
        device = x.device.type
        autocast = compat.autocast_dtype(device)
        dtype = autocast or x.dtype
        merged = merge(module.weight, delta, dtype)
        bias = module.bias.to(dtype) if module.bias is not None else None
        ctx.module, ctx.network, ctx.index = module, network, index
        ctx.dtype, ctx.x_dtype, ctx.delta_dtype = dtype, x.dtype, delta.dtype
        ctx.save_for_backward(x)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            out = _op(module, _linear(network, index), x.to(dtype), merged, bias)
        # F.linear with a bias on a 3-D input returns a view; autograd forbids changing a custom function's view
        # in place, and Forge's transformer blocks add into its own Linear's output in place (`x += x_skip`).
        # ldm's blocks do not: torch's own Linear layers skip the copy.
        return out.clone() if out._is_view() and not isinstance(module, nn.Linear) else out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        module = ctx.module
        with torch.no_grad():
            merged = merge(module.weight, ctx.network.merged_delta(ctx.index, module.weight), ctx.dtype)
        x, grad = x.to(ctx.dtype), grad.to(ctx.dtype)
        if _linear(ctx.network, ctx.index):
            grad_x = grad @ merged if ctx.needs_input_grad[0] else None
            grad_merged = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        else:
            grad_x, grad_merged, _ = torch.ops.aten.convolution_backward(
                grad, x, merged, None, _pair(module.stride), _pair(module.padding), _pair(module.dilation), False,
                [0, 0], module.groups, [ctx.needs_input_grad[0], True, False])
        grad_x = grad_x.to(ctx.x_dtype) if grad_x is not None else None
        return grad_x, grad_merged.to(ctx.delta_dtype), None, None, None


def _pair(value) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _op(module: nn.Module, linear: bool, x: torch.Tensor, weight: torch.Tensor,
        bias: torch.Tensor | None) -> torch.Tensor:
    if linear:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, module.stride, module.padding, module.dilation, module.groups)


def _merged_attention_forward(attention: nn.MultiheadAttention, adapters: dict[str, Adapter]):
    """nn.MultiheadAttention's forward (its general path) with in_proj_weight + cat(ΔWq, ΔWk, ΔWv) and
    out_proj.weight + ΔWout: the weights the WebUI's Lora extension writes into the attention."""
    q, k, v, out = (adapters[part] for part in FUSED_PARTS)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        dtype = compat.autocast_dtype(query.device.type) or query.dtype
        in_merged = merge(attention.in_proj_weight, torch.cat([q.delta(), k.delta(), v.delta()]), dtype)
        out_merged = merge(attention.out_proj.weight, out.delta(), dtype)
        transpose = attention.batch_first and query.dim() == 3
        if transpose:  # keep `query is key is value` (self-attention's packed projection), as torch does
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        output, weights = F.multi_head_attention_forward(
            query, key, value, attention.embed_dim, attention.num_heads, in_merged, attention.in_proj_bias,
            attention.bias_k, attention.bias_v, attention.add_zero_attn, attention.dropout, out_merged,
            attention.out_proj.bias, training=attention.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        return (output.transpose(1, 0) if transpose else output), weights

    return forward
