"""Stable Diffusion 1.x: a UNet conditioned on a CLIP ViT-L text encoder, predicting noise (eps).

The family's rules, which hold however a host keeps the model: which UNet blocks hold the layers a network adapts,
how a layer's file key is written, how cached captions stack into a batch, the file's metadata. Keys are written the
way kohya's tools write SD1 files (`lora_unet_<diffusers path>`, `lora_te_text_model_…`), which A1111's Lora
extension, ComfyUI and kohya's scripts all read. A UNet whose layout is not SD1's (2 res blocks on each of 4 levels)
keeps the ldm path, which the host also matches.

And the reference model of the family, an ldm LatentDiffusion (the WebUI's model, the command line's and the
tests'): `parts(model)` answers the engine's questions from it.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..parts import ModelParts

# The UNet blocks that hold what LoHa adapts, by ldm class name (the host's own classes are ldm's).
ATTENTION_BLOCKS = ("SpatialTransformer",)
CONV_BLOCKS = ("ResBlock", "Downsample", "Upsample")
TEXT_LAYER = re.compile(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")

_RESNET_SUFFIX = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
                  "skip_connection": "conv_shortcut"}
# The layers outside the blocks, as kohya (and LyCORIS' `full` preset) name them; the host maps them back
# (`convert_diffusers_name_to_compvis`), as ComfyUI does (`UNET_MAP_BASIC`). SD1 has no label embedding.
_OUTSIDE_BLOCKS = {"input_blocks.0.0": "conv_in", "out.2": "conv_out", "time_embed.0": "time_embedding.linear_1",
                   "time_embed.2": "time_embedding.linear_2"}


def _is_sd1_layout(unet: nn.Module) -> bool:
    return (len(getattr(unet, "input_blocks", ())) == 12 and len(getattr(unet, "output_blocks", ())) == 12
            and getattr(unet, "num_res_blocks", None) in (2, [2, 2, 2, 2]))


def ldm_to_diffusers(path: str) -> str | None:
    """`input_blocks.1.1.proj_in` → `down_blocks.0.attentions.0.proj_in` for the SD1 layout; None if unmapped.

    The inverse of the host's `convert_diffusers_name_to_compvis` (extensions-builtin/Lora/networks.py).
    """
    if path in _OUTSIDE_BLOCKS:
        return _OUTSIDE_BLOCKS[path]
    parts = path.split(".")
    if parts[0] == "input_blocks":
        index, sub, rest = int(parts[1]), int(parts[2]), parts[3:]
        level, pos = divmod(index - 1, 3)
        if index == 0:
            return None
        if pos == 2:  # the level's downsampler: input_blocks.{3,6,9}.0.op
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == ["op"] else None
        return _block(f"down_blocks.{level}", sub, pos, rest)
    if parts[0] == "middle_block":
        index, rest = int(parts[1]), parts[2:]
        if index == 1:
            return "mid_block.attentions.0." + ".".join(rest)
        return _block("mid_block", 0, index // 2, rest)
    if parts[0] == "output_blocks":
        index, sub, rest = int(parts[1]), int(parts[2]), parts[3:]
        level, pos = divmod(index, 3)
        if rest == ["conv"] and (sub == 2 or (sub == 1 and level == 0)):  # Upsample after the 3rd resnet
            return f"up_blocks.{level}.upsamplers.0.conv"
        return _block(f"up_blocks.{level}", sub, pos, rest)
    return None


def _block(prefix: str, sub: int, pos: int, rest: list[str]) -> str | None:
    if sub == 1:
        return f"{prefix}.attentions.{pos}." + ".".join(rest)
    if sub == 0:
        suffix = _RESNET_SUFFIX.get(".".join(rest))
        return f"{prefix}.resnets.{pos}.{suffix}" if suffix else None
    return None


def clip_layers(transformer: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """(file key, Linear) for the attention projections and MLP of every layer of a transformers CLIP."""
    return [(prefix + path.replace(".", "_"), module) for path, module in transformer.named_modules()
            if TEXT_LAYER.search(path) and isinstance(module, nn.Linear)]


class SD1:
    """The SD1 family. Stateless: the rules take what they need, the ldm accessors take the model object."""

    name = "sd1"
    # Which UNet blocks hold the layers a network adapts (ldm class names; SD2 and SDXL's UNets are ldm's too)
    attention_blocks = ATTENTION_BLOCKS
    conv_blocks = CONV_BLOCKS
    label = "SD 1.x"
    card_version = "SD1"  # the "sd version" the WebUI's Lora card understands (SD1, SD2, SDXL, Unknown)
    applies_clip_skip = True  # the run's CLIP skip is used (and recorded in ss_clip_skip)
    # What the "full" targets add outside the blocks (ldm paths; a UNet without one, SD1's label embedding, skips it)
    outer_layers = ("time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "input_blocks.0.0", "out.2")
    # kohya's block learning-rate weights: how many blocks of each kind (sd-scripts' networks/lora.py)
    lr_blocks = {"down": 12, "mid": 1, "up": 12}

    # --- the family's rules -----------------------------------------------------------------------------------

    @classmethod
    def unet_key(cls, unet: nn.Module, path: str) -> str:
        diffusers = ldm_to_diffusers(path) if _is_sd1_layout(unet) else None
        return "lora_unet_" + (diffusers or path).replace(".", "_")

    @classmethod
    def lr_block(cls, path: str) -> tuple[str, int] | None:
        """The block a UNet layer's learning-rate weight comes from (lohatrain.targets), or None outside them."""
        top, *rest = path.split(".")
        kind = {"input_blocks": "down", "middle_block": "mid", "output_blocks": "up"}.get(top)
        if kind is None:
            return None
        return kind, int(rest[0]) if kind != "mid" or cls.lr_blocks["mid"] > 1 else 0

    @staticmethod
    def stack_conditioning(conds: list[torch.Tensor], empty: torch.Tensor | None) -> torch.Tensor:
        """One batch of cached captions. A caption past 75 tokens encodes to more 77-token chunks; shorter ones
        are padded with the empty caption's chunk (cached whenever lengths differ), as the host pads cond and
        uncond to the same length."""
        longest = max(c.shape[1] for c in conds)
        return torch.cat([c if c.shape[1] == longest else
                          torch.cat([c, empty.repeat(1, (longest - c.shape[1]) // empty.shape[1], 1)], dim=1)
                          for c in conds])

    @staticmethod
    def metadata(v_prediction: bool) -> dict[str, str]:
        return {"ss_base_model_version": "sd_v1", "ss_v2": "False"}

    # --- the ldm model ------------------------------------------------------------------------------------------

    @classmethod
    def parts(cls, model) -> ModelParts:
        """The engine's view of an ldm model of this family."""
        text_encoder = cls.text_encoder(model)
        return ModelParts(
            family=cls, unet=cls.unet(model), vae=model.first_stage_model, text_encoder=text_encoder,
            predict=partial(cls.predict, model), prompt_encoder=partial(cls.prompt_encoder, model),
            encode_images=partial(cls.encode_images, model), alphas_cumprod=cls.alphas_cumprod(model),
            v_prediction=cls.v_prediction(model), text_layers=partial(cls.text_layers, text_encoder),
            applies_clip_skip=cls.applies_clip_skip, condition_on_images=partial(cls.condition_on_images, model),
            root=model, text_training=partial(cls.text_training, model))

    @staticmethod
    def matches(model) -> bool:
        if any(getattr(model, flag, False) for flag in ("is_sdxl", "is_sd2", "is_sd3")):
            return False
        unet = getattr(getattr(model, "model", None), "diffusion_model", None)
        return unet is not None and hasattr(model, "get_learned_conditioning") and hasattr(model, "alphas_cumprod")

    @staticmethod
    def unet(model) -> nn.Module:
        return model.model.diffusion_model

    @staticmethod
    def v_prediction(model) -> bool:
        return getattr(model, "parameterization", "eps") == "v"

    @staticmethod
    def alphas_cumprod(model) -> torch.Tensor:
        """The checkpoint's schedule: the host keeps it in `alphas_cumprod_original` when it may overwrite
        `alphas_cumprod` for sampling (its "Zero Terminal SNR" option, or an fp16 copy)."""
        original = getattr(model, "alphas_cumprod_original", None)
        return original if original is not None else model.alphas_cumprod

    @staticmethod
    def text_encoder(model) -> nn.Module:
        """The transformers CLIPTextModel, inside the host's wrapper (`.wrapped`) or ldm's embedder."""
        stage = model.cond_stage_model
        return getattr(stage, "wrapped", stage).transformer

    @staticmethod
    def text_layers(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        return clip_layers(text_encoder, "lora_te_")

    @classmethod
    def prompt_encoder(cls, model, clip_skip: int | None):
        """captions → conditioning through the model's own `get_learned_conditioning`, at this CLIP skip."""
        def encode(captions: list[str]):
            with cls.clip_skip(model, clip_skip):
                return model.get_learned_conditioning(captions)

        return encode

    @staticmethod
    def condition_on_images(model, cond, sizes: list[tuple[int, ...]]):
        """Add what each image contributes to the conditioning (SDXL: its sizes and crop); nothing here."""
        return cond

    @staticmethod
    @contextmanager
    def text_training(model):
        """Whatever the text path needs to pass gradients to a text-encoder network; nothing here."""
        yield

    @staticmethod
    @contextmanager
    def clip_skip(model, skip: int | None):
        """CLIP skip on ldm's own FrozenCLIPEmbedder (`layer`/`layer_idx`); the WebUI adapter uses its option."""
        stage = model.cond_stage_model
        if skip is None or not hasattr(stage, "layer"):
            yield
            return
        saved = stage.layer, stage.layer_idx
        stage.layer, stage.layer_idx = ("last", saved[1]) if skip <= 1 else ("hidden", -skip)
        try:
            yield
        finally:
            stage.layer, stage.layer_idx = saved

    @staticmethod
    def encode_images(model, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → scaled latents, exactly as the model samples them."""
        return model.get_first_stage_encoding(model.encode_first_stage(images))

    @staticmethod
    def predict(model, noisy: torch.Tensor, timesteps: torch.Tensor, cond) -> torch.Tensor:
        return model.apply_model(noisy, timesteps, cond)
