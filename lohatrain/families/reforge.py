"""SD1, SD2 and SDXL as reForge `main` holds them (Panchovix/stable-diffusion-webui-reForge, read at 3b56b26).

reForge keeps A1111's model object (an ldm/sgm LatentDiffusion) but fills it with the parts of Forge's first backend,
`ldm_patched` (`modules_forge/forge_loader.py`, `load_model_for_a1111`): `model.diffusion_model` is ldm_patched's UNet,
`first_stage_model` its VAE's, the text encoders are ldm_patched's transformers CLIPs inside A1111-style wrappers, and
`forge_objects` holds the patchers its memory manager loads. What differs from the A1111 families, all of it here:

- its memory manager moves the UNet, VAE and text encoders between devices by itself (`host_managed`): the trainer
  moves nothing and the host adapter (lohatrain.reforge) tells the manager what a step needs;
- `encode_first_stage` runs under `torch.inference_mode`: latents are cloned into ordinary tensors;
- SD 2.x: the OpenCLIP embedder's `model` is a placeholder and its `transformer` a transformers `CLIPTextModel`
  (read from the checkpoint's `clip_h`), and reForge leaves `is_sd2` False (it looks for a `model` on the wrapper);
  the family is told by that embedder, and the text encoder is trained as SD1's, under the same kohya keys
  (`lora_te_text_model_encoder_layers_N_…`, which reForge's ComfyUI-derived loader maps onto `clip_h`);
- SDXL: both text encoders are transformers CLIPs there, which the SDXL family's text-encoder path does not cover.
"""
from __future__ import annotations

from torch import nn

from .sd1 import SD1, clip_layers
from .sd2 import SD2
from .sdxl import SDXL


def is_reforge_model(model) -> bool:
    """reForge's A1111 model: ldm's (with `model`) and Forge's patchers beside it. Forge 2's engine has no `model`."""
    return getattr(model, "forge_objects", None) is not None and hasattr(model, "model")


def _sd2_transformer(model) -> nn.Module | None:
    """The transformers CLIP inside reForge's SD 2.x wrapper (ldm's `FrozenOpenCLIPEmbedder`), or None."""
    wrapped = getattr(getattr(model, "cond_stage_model", None), "wrapped", None)
    if type(wrapped).__name__ != "FrozenOpenCLIPEmbedder":
        return None
    transformer = getattr(wrapped, "transformer", None)
    return transformer if isinstance(transformer, nn.Module) and hasattr(transformer, "text_model") else None


class _ReForge:
    """What every reForge family does the same way (mixed in before the A1111 family)."""

    host_managed = True

    @classmethod
    def encode_images(cls, model, images):
        return super().encode_images(model, images).clone()  # made under inference mode: an ordinary copy


class ReForgeSD1(_ReForge, SD1):
    @staticmethod
    def matches(model) -> bool:
        return is_reforge_model(model) and SD1.matches(model) and _sd2_transformer(model) is None


class ReForgeSD2(_ReForge, SD2):
    @staticmethod
    def matches(model) -> bool:
        return is_reforge_model(model) and not getattr(model, "is_sdxl", False) and _sd2_transformer(model) is not None

    @staticmethod
    def text_encoder(model) -> nn.Module:
        return _sd2_transformer(model)

    @staticmethod
    def text_layers(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        return clip_layers(text_encoder, "lora_te_")


class ReForgeSDXL(_ReForge, SDXL):
    text_training_refusal = ("the text encoders cannot be trained on SDXL in reForge: both are transformers CLIPs "
                             "there, which lohatrain's SDXL text-encoder training does not cover. Set the "
                             "text-encoder learning rate to 0 (the UNet is trained)")

    @staticmethod
    def matches(model) -> bool:
        return is_reforge_model(model) and SDXL.matches(model)
