"""Forge 2's loaded model during a run: its memory manager (`backend.memory_management`) and its LoRA patches.

Forge moves models between devices by itself, under `torch.inference_mode`, whenever something loads a part (its
text encoders for a prompt, its VAE for an image): a run tells it what a training step needs, the whole UNet on its
device, before the first step and after each preview. LoRAs the user had active are merged into the UNet's weights
by the loaded patcher (`LoraLoader.refresh`); loading the unpatched patcher (`forge_objects_original.unet`) puts
the checkpoint's weights back, so training starts from the pure checkpoint, and the patcher that was loaded
before is loaded again afterwards (its LoRAs merged again, as Forge's next generation would).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from backend import memory_management

from ..errors import LohatrainError

# The room a training step needs beside the UNet's weights, as a multiple of their size: activations kept for
# backward, their gradients and the optimizer's state (a rough, generous figure; Forge then unloads what it must).
STEP_MEMORY_FACTOR = 2.0


def _loaded(patcher):
    return next((m for m in memory_management.current_loaded_models if m.model is patcher), None)


def _loaded_unet_patcher(sd_model):
    kmodel = sd_model.forge_objects.unet.model
    return next((m.model for m in memory_management.current_loaded_models if m.model.model is kmodel), None)


@contextmanager
def unet_session(sd_model) -> Iterator[Callable[[], None]]:
    """For one run: the checkpoint's own UNet weights (LoRAs taken off) and a `load_unet` for the trainer; the
    patcher that was loaded before is loaded again at the end."""
    before = _loaded_unet_patcher(sd_model)
    original = sd_model.forge_objects_original.unet
    size = sum(p.numel() * p.element_size() for p in original.model.diffusion_model.parameters())

    def load_unet() -> None:
        with torch.inference_mode():
            memory_management.load_models_gpu([original], memory_required=int(STEP_MEMORY_FACTOR * size))
        loaded = _loaded(original)
        if loaded is None or getattr(loaded, "model_accelerated", False):
            raise LohatrainError(
                "Forge could not fit the whole UNet in GPU memory next to what a training step needs, so it would "
                "keep part of it in CPU memory, which a training step cannot follow: lower the batch size or the "
                "resolution, turn on gradient checkpointing, or close other programs using the GPU")

    load_unet()
    try:
        yield load_unet
    finally:
        if before is not None and before is not original:
            with torch.inference_mode():
                memory_management.load_models_gpu([before])
