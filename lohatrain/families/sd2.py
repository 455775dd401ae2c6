"""Stable Diffusion 2.x: an ldm LatentDiffusion with an OpenCLIP ViT-H text encoder, predicting v (768-v
models) or eps (the 512 base).

What SD2 shares with SD1 is inherited: the UNet has SD1's block layout (linear instead of 1x1 proj_in /
proj_out, which the same keys name), so its keys are SD1's diffusers-style keys, and the VAE, latents and
`apply_model` work the same. What differs is here:

- the text encoder is ldm's `FrozenOpenCLIPEmbedder` (inside the host's wrapper, `.wrapped`), whose `.model`
  is an open_clip model: `transformer.resblocks.N` with a fused `nn.MultiheadAttention` (`attn`) and an MLP
  `mlp.c_fc` / `mlp.c_proj`. Keys use kohya's CLIP names, which the host maps back
  (`convert_diffusers_name_to_compvis(..., is_sd2=True)` in extensions-builtin/Lora/networks.py):
  `lora_te_text_model_encoder_layers_N_self_attn_{q,k,v,out}_proj` onto `attn` (q/k/v as the thirds of
  `in_proj_weight`, applied only when all four are present) and `…_mlp_fc1` / `…_mlp_fc2` onto `c_fc` / `c_proj`;
- the host ignores its CLIP-skip option on SD2 (`FrozenOpenCLIPEmbedderWithCustomWords.encode_with_transformers`
  uses the checkpoint's configured layer, penultimate), so training does too;
- metadata: `ss_v2` "True" (how the host's Lora tab tells SD2 files apart and shows them on SD2 models),
  `ss_base_model_version` "sd_v2", and kohya's `ss_v_parameterization`.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .sd1 import SD1

OPENCLIP_MLP = {"c_fc": "mlp_fc1", "c_proj": "mlp_fc2"}


def openclip_layers(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(file key, module) per residual block of an open_clip text model, in kohya's CLIP names: the fused
    attention under `…_self_attn` (the network adds `_q_proj`, `_k_proj`, `_v_proj`, `_out_proj`), and the
    two MLP Linears."""
    layers = []
    for i, block in enumerate(model.transformer.resblocks):
        layer = f"{prefix}text_model_encoder_layers_{i}_"
        layers.append((layer + "self_attn", block.attn))
        for name, kohya in OPENCLIP_MLP.items():
            layers.append((layer + kohya, getattr(block.mlp, name)))
    return layers


def _openclip_model(stage) -> nn.Module | None:
    """The open_clip model of an (optionally host-wrapped) OpenCLIP embedder, or None for anything else."""
    model = getattr(getattr(stage, "wrapped", stage), "model", None)
    resblocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    return model if isinstance(model, nn.Module) and resblocks is not None else None


class SD2(SD1):
    """The SD2 family. Stateless: every method takes the model object."""

    name = "sd2"
    label = "SD 2.x"
    card_version = "SD2"
    applies_clip_skip = False

    @staticmethod
    def matches(model) -> bool:
        """The host's `is_sd2` flag, or (a plain ldm model) an OpenCLIP cond stage, as the host decides it."""
        if getattr(model, "is_sdxl", False) or getattr(model, "is_sd3", False):
            return False
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
        if unet is None or not hasattr(model, "get_learned_conditioning") or not hasattr(model, "alphas_cumprod"):
            return False
        stage = getattr(model, "cond_stage_model", None)
        return bool(getattr(model, "is_sd2", False)) or _openclip_model(stage) is not None

    @staticmethod
    def text_encoder(model) -> nn.Module:
        """The open_clip model (`.model` of ldm's FrozenOpenCLIPEmbedder, inside the host's `.wrapped`)."""
        return _openclip_model(model.cond_stage_model)

    @staticmethod
    def text_layers(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        return openclip_layers(text_encoder, "lora_te_")

    @staticmethod
    @contextmanager
    def clip_skip(model, skip: int | None):
        """Nothing to do: the host encodes SD2 prompts with the checkpoint's configured layer whatever its
        CLIP-skip option says, so a LoHa trained on another layer would be used on the wrong one."""
        yield

    @staticmethod
    def metadata(v_prediction: bool) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v2", "ss_v2": "True", "ss_v_parameterization": str(v_prediction)}
