"""SD1, SD2 and SDXL as Forge 2 holds them (lllyasviel/stable-diffusion-webui-forge, its `backend`).

Forge's `shared.sd_model` is a `ForgeDiffusionEngine` (not an `nn.Module`, no `model`, `alphas_cumprod` or
`parameterization`); its parts are in `forge_objects`: the UNet at `unet.model.diffusion_model` (ldm's module
names and block classes, Forge's layer classes), the schedule and prediction type at `unet.model.predictor`, the
text encoders at `clip.cond_stage_model`, the VAE at `vae.first_stage_model`. What differs from the ldm families, all
of it here:

- conditioning and latents come from the engine's own `get_learned_conditioning` / `encode_first_stage`, which run
  under `torch.inference_mode`: their outputs are cloned into ordinary tensors;
- the UNet is called directly, `(x, timesteps, context=crossattn[, y=vector])`, as Forge's KModel calls it;
- Forge's `BasicTransformerBlock` adds attention and MLP outputs into its input in place (`x += n`), which
  autograd refuses after a LayerNorm kept that input for its backward: while training, those LayerNorms get a
  copy of their input (`unet_training`), the same numbers;
- SDXL's size part of the vector is computed with the engine's own `embedder` (Forge's `Timestep`), per image;
- the text encoders cannot be trained: Forge's whole text path runs under inference mode;
- Forge's memory manager moves parts between devices by itself (`host_managed`): the trainer moves nothing and
  the host adapter tells the manager what a step needs.
Keys and metadata are those of the ldm families (Forge loads files with ComfyUI's key rules, which accept both).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL


def is_forge_engine(model) -> bool:
    """Forge 2's engine. reForge's `main` also has `forge_objects`, but on an A1111 model (with `model`): not this."""
    return getattr(model, "forge_objects", None) is not None and not hasattr(model, "model")


def _clone(cond):
    """Inference-mode outputs as ordinary tensors (a clone made outside inference mode is one)."""
    return {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()


class _Forge:
    """What every Forge family does the same way (mixed in before the ldm family)."""

    host_managed = True
    text_training_refusal = ("the text encoder cannot be trained in Forge: Forge runs its whole text path under "
                             "torch.inference_mode. Set the text-encoder learning rate to 0 (the UNet is trained)")

    @staticmethod
    def unet(model) -> nn.Module:
        return model.forge_objects.unet.model.diffusion_model

    @staticmethod
    def vae(model) -> nn.Module:
        return model.forge_objects.vae.first_stage_model

    @staticmethod
    def text_encoder(model) -> nn.Module:
        return model.forge_objects.clip.cond_stage_model

    @staticmethod
    def v_prediction(model) -> bool:
        return model.forge_objects.unet.model.predictor.prediction_type == "v_prediction"

    @staticmethod
    def alphas_cumprod(model) -> torch.Tensor:
        """The checkpoint's schedule; Forge's zero-terminal-SNR option changes only the predictor's sigmas."""
        return model.forge_objects.unet.model.predictor.alphas_cumprod

    @staticmethod
    def prompt_encoder(model):
        return lambda captions: _clone(model.get_learned_conditioning(captions))

    @staticmethod
    def encode_images(model, images: torch.Tensor) -> torch.Tensor:
        return model.get_first_stage_encoding(model.encode_first_stage(images)).clone()

    @staticmethod
    @contextmanager
    def clip_skip(model, skip: int | None):
        """Forge's engine has a setter only; the host adapter's prompt encoder handles the option."""
        yield

    @staticmethod
    @contextmanager
    def unet_training(unet: nn.Module):
        """Each LayerNorm of a transformer block normalises a copy of its input (see the module's doc); the
        forwards are instance attributes, removed on exit."""
        norms = [m for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock"
                 for m in block.modules() if isinstance(m, nn.LayerNorm)]
        for norm in norms:
            norm.forward = _on_a_copy(norm.forward)
        try:
            yield
        finally:
            for norm in norms:
                norm.__dict__.pop("forward", None)


def _on_a_copy(forward):
    return lambda x: forward(x.clone())


class ForgeSD1(_Forge, SD1):
    name = "sd1"

    @staticmethod
    def matches(model) -> bool:
        return is_forge_engine(model) and bool(getattr(model, "is_sd1", False))

    @staticmethod
    def predict(model, noisy, timesteps, cond):
        return ForgeSD1.unet(model)(noisy, timesteps.float(), context=cond)


class ForgeSD2(ForgeSD1):
    name = "sd2"
    label, card_version, applies_clip_skip = SD2.label, SD2.card_version, SD2.applies_clip_skip

    @staticmethod
    def matches(model) -> bool:
        return is_forge_engine(model) and bool(getattr(model, "is_sd2", False))

    @staticmethod
    def metadata(model) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v2", "ss_v2": "True",
                "ss_v_parameterization": str(ForgeSD2.v_prediction(model))}


class ForgeSDXL(_Forge, SDXL):
    name = "sdxl"

    @staticmethod
    def matches(model) -> bool:
        return is_forge_engine(model) and bool(getattr(model, "is_sdxl", False)) and hasattr(model, "embedder")

    @staticmethod
    def condition_on_images(model, cond: dict, sizes: list[tuple[int, ...]]) -> dict:
        """The size part of the vector, per image: Forge's embedder on height, width, crop top, crop left,
        target height, target width, in that order (as its get_learned_conditioning)."""
        vector = cond["vector"]
        values = torch.tensor(sizes, dtype=torch.float32)
        with torch.no_grad():
            embedded = torch.cat([model.embedder(values[:, i]) for i in range(values.shape[1])], dim=1)
        text_part = vector[:, :vector.shape[1] - embedded.shape[1]]
        return {**cond, "vector": torch.cat([text_part, embedded.to(vector)], dim=1)}

    @staticmethod
    def predict(model, noisy, timesteps, cond: dict):
        return ForgeSDXL.unet(model)(noisy, timesteps.float(), context=cond["crossattn"], y=cond["vector"])
