"""What the engine trains: one model's parts, however the program holding it keeps them.

The engine asks every model the same few things: its UNet, VAE and text encoder, how to predict, how to turn
captions and images into conditioning and latents, its noise schedule and its family (SD1, SD2, SDXL: naming,
targets, metadata). A host adapter (lohatrain/hosts/) answers from its own model object; a plain ldm or sgm model
(the command line's, the tests', and A1111's, which is one) is answered by its family (`families.ldm_parts`).
Nothing in the engine looks at the model object itself.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

Conditioning = object  # one tensor (SD1, SD2) or SDXL's dict of them


def _as_is(cond, sizes):
    return cond


@dataclass
class ModelParts:
    family: type  # lohatrain.families.SD1, SD2 or SDXL
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module  # SDXL: the conditioner holding both
    predict: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]  # noisy latents, timesteps, cond
    prompt_encoder: Callable[[int | None], Callable[[list[str]], Conditioning]]  # CLIP skip → captions → cond
    encode_images: Callable[[torch.Tensor], torch.Tensor]  # pixels in [-1, 1] → scaled latents
    alphas_cumprod: torch.Tensor  # the checkpoint's noise schedule
    v_prediction: bool
    text_layers: Callable[[], list[tuple[str, nn.Module]]]  # (file key, layer) of the text encoder(s)
    applies_clip_skip: bool  # whether `prompt_encoder` uses the CLIP skip it is given (and the file records it)
    condition_on_images: Callable[[Conditioning, list[tuple[int, ...]]], Conditioning] = _as_is  # SDXL's sizes
    name: str = "unknown"  # the checkpoint's file name, for the file's metadata
    hash: str = ""  # the checkpoint's hash when the host knows it
    root: nn.Module | None = None  # the whole model, when it is a module: its own flags and buffers are guarded too
    managed: bool = False  # the host's memory manager moves the parts (Forge, reForge): the trainer moves none
    offload_device: str | torch.device = "cpu"  # else where the trainer puts the VAE and text encoder once cached
    linear_types: tuple[type, ...] = (nn.Linear,)  # a host's own Linear classes that are not nn.Linear
    text_training_refusal: str | None = None  # why this host cannot train the text encoder, if it cannot
    unet_training: Callable[[], ContextManager] = nullcontext  # what the UNet's forward needs for a backward pass
    text_training: Callable[[], ContextManager] = nullcontext  # what the text path needs to pass gradients

    @property
    def metadata(self) -> dict[str, str]:
        """The family's `ss_*` keys for this model."""
        return self.family.metadata(self.v_prediction)
