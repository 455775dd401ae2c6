"""SDXL: an `sgm` DiffusionEngine with two text encoders, a "vector" conditioning and a 3-level UNet.

What differs from SD1, all of it here:

- conditioning is sgm's dict `{"crossattn": [B, 77·k, 2048], "vector": [B, 2816]}` from `model.conditioner`:
  CLIP-L and OpenCLIP-bigG hidden states side by side, and the vector = bigG's pooled embedding followed by
  Fourier embeddings of the image's original size (h, w), crop top-left (top, left) and target size (h, w).
  The text part comes from the caller's prompt encoder (the WebUI's own path, cached per caption); the size
  part is computed per image by the conditioner's own size embedders (`condition_on_images`), because the
  WebUI's path puts one size (the generation's) and no crop into every prompt;
- the text encoders are the conditioner's embedders 0 (CLIP-L, a transformers CLIPTextModel) and 1 (an
  open_clip model, fused attention); inside the WebUI each sits in a wrapper as `.wrapped`. Keys:
  `lora_te1_text_model_…` and `lora_te2_text_model_…` (the bigG attention as a complete q/k/v/out set), which
  the WebUI maps onto embedders 0 and 1 (extensions-builtin/Lora/networks.py);
- UNet keys keep the ldm path (`lora_unet_input_blocks_4_1_…`): the only SDXL naming the WebUI matches;
- sgm runs embedders whose `is_trainable` is false under no_grad, so a text-encoder LoHa needs it set while
  training (`text_training`);
- the WebUI ignores CLIP skip on SDXL (unless its `sdxl_clip_l_skip` option is on), and so does training;
- metadata: `ss_base_model_version` "sdxl_base_v1-0" (the WebUI's Lora tab files it under SDXL by the
  `sdxl_` prefix).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .sd1 import SD1, clip_layers
from .sd2 import openclip_layers

SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
DEFAULT_SIZE = 1024  # what the WebUI puts in the vector for a plain list of prompts


def _inner(embedder: nn.Module) -> nn.Module:
    """The sgm embedder, inside the WebUI's wrapper (`.wrapped`) or bare."""
    return getattr(embedder, "wrapped", embedder)


def _size_embedders(model) -> list[nn.Module]:
    return [e for e in model.conditioner.embedders if getattr(e, "input_key", None) in SIZE_KEYS]


class SDXL(SD1):
    """The SDXL (base) family. Stateless: every method takes the model object."""

    name = "sdxl"
    label = "SDXL"
    card_version = "SDXL"
    applies_clip_skip = False
    lr_blocks = {"down": 9, "mid": 3, "up": 9}  # kohya's: the middle block's ResBlock, transformer, ResBlock

    @staticmethod
    def matches(model) -> bool:
        """The WebUI's `is_sdxl` (it has a `conditioner`), with SDXL base's text encoders and size inputs."""
        conditioner = getattr(model, "conditioner", None)
        if conditioner is None or getattr(model, "is_sd3", False):
            return False
        embedders = list(conditioner.embedders)
        return (len(embedders) >= 2 and hasattr(_inner(embedders[0]), "transformer")
                and hasattr(_inner(embedders[1]), "model")
                and sorted(e.input_key for e in _size_embedders(model)) == sorted(SIZE_KEYS))

    @staticmethod
    def text_encoder(model) -> nn.Module:
        """The conditioner: it holds both text encoders (and the parameter-free size embedders)."""
        return model.conditioner

    @staticmethod
    def unet_key(unet: nn.Module, path: str) -> str:
        return "lora_unet_" + path.replace(".", "_")

    @staticmethod
    def text_layers(text_encoder: nn.Module) -> list[tuple[str, nn.Module]]:
        embedders = text_encoder.embedders
        return (clip_layers(_inner(embedders[0]).transformer, "lora_te1_")
                + openclip_layers(_inner(embedders[1]).model, "lora_te2_"))

    @staticmethod
    def prompt_encoder(model, clip_skip: int | None):
        """sgm's conditioner on the captions, as the WebUI's `get_learned_conditioning` calls it (the sizes
        are placeholders: `condition_on_images` puts each image's own in). CLIP skip does not apply (see above)."""
        def encode(captions: list[str]) -> dict:
            device = next(model.conditioner.parameters()).device
            size = torch.tensor([DEFAULT_SIZE, DEFAULT_SIZE], device=device).repeat(len(captions), 1)
            batch = {"txt": captions, "original_size_as_tuple": size, "target_size_as_tuple": size,
                     "crop_coords_top_left": torch.zeros_like(size)}
            return model.conditioner(batch)

        return encode

    @staticmethod
    def stack_conditioning(conds: list[dict], empty: dict | None) -> dict:
        """Token parts padded to the longest caption as SD1's; the per-prompt vectors only stacked."""
        crossattn = SD1.stack_conditioning([c["crossattn"] for c in conds], empty and empty["crossattn"])
        return {"crossattn": crossattn, "vector": torch.cat([c["vector"] for c in conds])}

    @staticmethod
    def condition_on_images(model, cond: dict, sizes: list[tuple[int, ...]]) -> dict:
        """Each image's (original h, w, crop top, left, target h, w), embedded by the conditioner's own size
        embedders, replaces the size part at the end of the vector."""
        vector = cond["vector"]
        values = torch.tensor(sizes, dtype=torch.float32, device=vector.device)
        columns = {key: values[:, 2 * i:2 * i + 2] for i, key in enumerate(SIZE_KEYS)}
        embedded = torch.cat([e(columns[e.input_key]) for e in _size_embedders(model)], dim=1)
        text_part = vector[:, :vector.shape[1] - embedded.shape[1]]
        return {**cond, "vector": torch.cat([text_part, embedded.to(vector.dtype)], dim=1)}

    @staticmethod
    @contextmanager
    def text_training(model):
        embedders = list(model.conditioner.embedders[:2])
        saved = [e.is_trainable for e in embedders]
        for e in embedders:
            e.is_trainable = True
        try:
            yield
        finally:
            for e, value in zip(embedders, saved):
                e.is_trainable = value

    @staticmethod
    def encode_images(model, images: torch.Tensor) -> torch.Tensor:
        """sgm's `encode_first_stage` already samples and scales (by 0.13025)."""
        return model.encode_first_stage(images)

    @staticmethod
    def predict(model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """sgm's wrapper call, which is what the WebUI's `apply_model` does for a non-inpainting SDXL."""
        return model.model(noisy, timesteps, cond)

    @staticmethod
    def metadata(v_prediction: bool) -> dict[str, str]:
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}
