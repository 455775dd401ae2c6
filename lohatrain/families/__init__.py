"""What differs between model families (SD1, SD2, SDXL): one small module each. `detect` tells an ldm/sgm model's
family (or why it cannot be trained); `ldm_parts` gives the engine's view of it. Hosts that hold a model their own
way (lohatrain/hosts/) use the same families' rules."""
from __future__ import annotations

from ..errors import LohatrainError
from ..parts import ModelParts
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL

# Most specific first: SD2 also has everything SD1.matches looks for.
FAMILIES = (SDXL, SD2, SD1)
BY_NAME = {f.name: f for f in FAMILIES}

# Why a kind of checkpoint cannot be trained, in one phrase each: said of a loaded model here, and of a file's
# keys by lohatrain.checkpoint. What a UNet's input channels beyond the 4 latent ones say about the checkpoint:
EXTRA_INPUTS = {9: "an inpainting checkpoint (its UNet also takes a mask and a masked image)",
                8: "an instruct-pix2pix checkpoint (its UNet also takes the source image)",
                5: "a depth-conditioned SD 2 checkpoint (its UNet also takes a depth map)"}
SD3 = "Stable Diffusion 3 (a different architecture, MMDiT, that lohatrain does not cover)"
FLUX = "Flux (a different architecture that lohatrain does not cover)"
UNCLIP = "an unCLIP checkpoint (conditioned on image embeddings, not captions)"
REFINER = "the SDXL refiner (it only refines the last denoising steps of a base model's image)"


def describe(model) -> str:
    """What the loaded model is, in the host's words where it says (its is_* flags, model_type)."""
    kind = type(model).__name__
    model_type = getattr(model, "model_type", None)
    if model_type is not None:
        name = getattr(model_type, "name", None) or str(model_type)
        return f"{name} ({kind})"
    for flag, name in (("is_sd3", "SD3"), ("is_ssd", "SSD-1B"), ("is_sdxl", "SDXL"), ("is_sd2", "SD 2.x"),
                       ("is_sd1", "SD 1.x")):
        if getattr(model, flag, False):
            return f"{name} ({kind})"
    return kind


def unsupported_reason(model, unet=None) -> str | None:
    """Why a loaded model of a known kind cannot be trained (a variant needing inputs a caption set lacks); `unet`
    where the host keeps it elsewhere than ldm's `model.diffusion_model`."""
    if getattr(model, "is_sd3", False):
        return SD3
    if "flux" in describe(model).lower():
        return FLUX
    unet = unet if unet is not None else getattr(getattr(model, "model", None), "diffusion_model", None)
    channels = getattr(unet, "in_channels", 4)
    if channels in EXTRA_INPUTS or getattr(model, "is_sdxl_inpaint", False) or getattr(model, "is_inpaint", False):
        return EXTRA_INPUTS.get(channels, EXTRA_INPUTS[9])
    if hasattr(model, "noise_augmentor") or getattr(getattr(model, "model", None), "conditioning_key", "") == "crossattn-adm":
        return UNCLIP
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None and any(getattr(e, "input_key", None) == "aesthetic_score"
                                       for e in conditioner.embedders):
        return REFINER
    return None


def cannot_train(reason: str) -> LohatrainError:
    return LohatrainError(
        f"lohatrain cannot train on the loaded model: it is {reason}. Load a Stable Diffusion 1.x, 2.x or SDXL "
        "base checkpoint (or a model fine-tuned or merged from one, such as Pony or Illustrious) and try again.")


def detect(model):
    """The family of an ldm/sgm model, or a clear error naming what cannot be trained."""
    reason = unsupported_reason(model)
    if reason is None:
        for family in FAMILIES:
            if family.matches(model):
                return family
        reason = f"a model of a kind it does not know, {describe(model)}"
    raise cannot_train(reason)


def ldm_parts(model) -> ModelParts:
    """The engine's view of an ldm/sgm model (the command line's, the tests', A1111's)."""
    return detect(model).parts(model)
