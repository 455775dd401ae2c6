"""Forge's UNet (backend/nn/unet.py, `IntegratedUNet2DConditionModel`) for the tiny test models.

Forge's UNet keeps ldm's module names and block classes (`SpatialTransformer`, `BasicTransformerBlock`, `ResBlock`,
`Downsample`, `Upsample`) and builds them with Forge's layer classes (backend/operations.py). The stand-in builds the
tiny ldm/sgm UNet's structure under `using_forge_operations` (so every `nn.Linear` is Forge's non-`nn.Linear` class)
and gives the blocks Forge's forwards. What an adapter has to respect, from Forge's source:
- `BasicTransformerBlock` adds its attention and MLP outputs in place (`x += n`): autograd refuses a backward
  through a LayerNorm whose input was changed that way afterwards;
- no gradient checkpointing of its own (Forge's `checkpoint` raises if enabled);
- `forward(x, timesteps, context, y, control, transformer_options)`; `timesteps` are the float model timesteps;
- `config` holds the UNet's layout (ComfyUI's LoRA key map reads it), and the loader sets `storage_dtype`,
  `computation_dtype`, `load_device`, `offload_device`, `initial_device`.
Ports backend/nn/unet.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import torch
from torch import nn

from ldm.modules.attention import BasicTransformerBlock as LdmBasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock as LdmResBlock
from ldm.modules.diffusionmodules.util import GroupNorm32, timestep_embedding

from backend.operations import ForgeOperations


class BasicTransformerBlock(LdmBasicTransformerBlock):
    def forward(self, x, context=None, transformer_options={}):
        n = self.norm1(x)
        n = self.attn1(n, context=context if self.disable_self_attn else None)
        x += n
        n = self.norm2(x)
        n = self.attn2(n, context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


class ResBlock(LdmResBlock):
    def forward(self, x, emb, transformer_options={}):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class IntegratedUNet2DConditionModel(nn.Module):
    """Only a class to swap in: the tiny UNet's modules, Forge's forward."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if getattr(self, "num_classes", None) is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h).type(x.dtype)


_FORGE_CLASSES = {LdmBasicTransformerBlock: BasicTransformerBlock, LdmResBlock: ResBlock,
                  GroupNorm32: ForgeOperations.GroupNorm}


def as_forge_unet(unet: nn.Module, config: dict) -> nn.Module:
    """Give a UNet built under `using_forge_operations` Forge's block classes and forwards."""
    for module in unet.modules():
        forge_class = _FORGE_CLASSES.get(type(module))
        if forge_class is not None:
            module.__class__ = forge_class
    unet.__class__ = type("IntegratedUNet2DConditionModel", (IntegratedUNet2DConditionModel, type(unet)), {})
    unet.config = config
    return unet
