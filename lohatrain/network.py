"""The LoHa network: lycoris-lora's LohaModule on each chosen layer, applied the way the WebUI applies it.

Which layers: Linear and 1x1 convs inside the UNet's attention blocks; with `conv_dim > 0` also the
layers of ResBlocks and down/up-samplers (3x3 convs get conv_dim/conv_alpha, the rest dim/alpha); with a
text-encoder learning rate, the CLIP attention and MLP Linears.

How a layer runs while training: lycoris-lora's own LohaModule.forward runs the base op and then a second
full-size op with ΔW, 1.5x the FLOPs of a step (counted in benchmarks/engine.py). We take only its maths
(`get_weight`: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/dim) and do one op with W + ΔW, which is also exactly how
the WebUI applies the file at inference. Where merging into a low-precision weight loses too much of a small
ΔW, `two_op=True` keeps lycoris' two ops (see README: when it is used).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lycoris.modules.loha import LohaModule
from torch import nn

from .families.sd1 import ATTENTION_BLOCKS, CONV_BLOCKS


@dataclass(frozen=True)
class LayerPlan:
    """One layer to adapt: its key in the file, the module, and the LoHa size for it."""

    key: str
    module: nn.Module
    dim: int
    alpha: float
    text_encoder: bool = False


def _is_3x3(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)


def plan_unet(family, unet: nn.Module, dim: int, alpha: float, conv_dim: int, conv_alpha: float) -> list[LayerPlan]:
    """The UNet layers to adapt, in module order, named by the family's key rule."""
    block_types = ATTENTION_BLOCKS + (CONV_BLOCKS if conv_dim > 0 else ())
    plans, seen = [], set()
    for block_path, block in unet.named_modules():
        if type(block).__name__ not in block_types:
            continue
        for child_path, module in block.named_modules():
            path = f"{block_path}.{child_path}" if child_path else block_path
            if path in seen or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            seen.add(path)
            if _is_3x3(module):
                if type(block).__name__ in ATTENTION_BLOCKS or conv_dim <= 0:
                    continue
                plans.append(LayerPlan(family.unet_key(unet, path), module, conv_dim, conv_alpha))
            else:
                plans.append(LayerPlan(family.unet_key(unet, path), module, dim, alpha))
    return plans


def plan_text_encoder(family, text_encoder: nn.Module, dim: int, alpha: float) -> list[LayerPlan]:
    return [LayerPlan(key, module, dim, alpha, text_encoder=True)
            for key, module in family.text_layers(text_encoder)]


def count_parameters(plans: list[LayerPlan]) -> int:
    """LoHa parameters for these layers: two (out×r, r×in·k·k) pairs each, plus one alpha scalar."""
    total = 0
    for p in plans:
        w = p.module.weight
        out_dim, fan_in = w.shape[0], w[0].numel()
        total += 2 * p.dim * (out_dim + fan_in) + 1
    return total


class LohaNetwork(nn.Module):
    """The trainable LoHa modules, kept apart from the model: attach() hooks them in, detach() undoes it."""

    def __init__(self, plans: list[LayerPlan], seed: int, two_op: bool = False):
        super().__init__()
        self.plans = plans
        self.two_op = two_op
        self.loras = nn.ModuleList()
        # lycoris draws its initial values from torch's global RNG: fork it so the caller's state is
        # untouched and the same seed always gives the same start.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for plan in plans:
                self.loras.append(LohaModule(plan.key, plan.module, multiplier=1.0,
                                             lora_dim=plan.dim, alpha=plan.alpha))
        self.loras.float()
        self._attached: list[tuple[nn.Module, object]] = []

    def parameters_of(self, text_encoder: bool) -> list[nn.Parameter]:
        return [p for plan, lora in zip(self.plans, self.loras) if plan.text_encoder == text_encoder
                for p in lora.parameters() if p.requires_grad]

    def attach(self) -> None:
        """Route each adapted layer's forward through its LoHa (an instance attribute, removed by detach)."""
        for plan, lora in zip(self.plans, self.loras):
            module = plan.module
            previous = module.__dict__.get("forward")
            module.forward = _two_op_forward(module, lora) if self.two_op else _merged_forward(module, lora)
            self._attached.append((module, previous))

    def detach(self) -> None:
        for module, previous in reversed(self._attached):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._attached.clear()

    def file_tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`<key>.hada_w1_a` … `<key>.alpha`, contiguous on the CPU in the save dtype (alpha too, as kohya)."""
        tensors = {}
        for plan, lora in zip(self.plans, self.loras):
            for name, value in lora.custom_state_dict().items():
                tensors[f"{plan.key}.{name}"] = value.detach().to("cpu", dtype).contiguous()
        return tensors


def _merged_forward(module: nn.Module, lora: LohaModule):
    op, kw, shape = lora.op, lora.kw_dict, lora.shape

    def forward(x):
        weight = module.weight
        merged = weight + lora.get_weight(shape).to(weight.dtype)
        return op(x, merged, module.bias, **kw)

    return forward


def _two_op_forward(module: nn.Module, lora: LohaModule):
    op, kw, shape = lora.op, lora.kw_dict, lora.shape

    def forward(x):
        base = op(x, module.weight, module.bias, **kw)
        return base + op(x, lora.get_weight(shape).to(x.dtype), None, **kw)

    return forward
