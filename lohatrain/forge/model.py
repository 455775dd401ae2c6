"""Forge 2's loaded model during a run: its memory manager (`backend.memory_management`) and its LoRA patches.

Forge moves models between devices by itself, under `torch.inference_mode`, whenever something loads a part (its
text encoders for a prompt, its VAE for an image): a run tells it what a training step needs, the whole UNet on its
device, before the first step and after each preview. LoRAs the user had active are merged into the UNet's weights
by the loaded patcher (`LoraLoader.refresh`); loading the unpatched patcher (`forge_objects_original.unet`) puts
the checkpoint's weights back, so training starts from the pure checkpoint (and previews, which sample
`forge_objects.unet`, get the unpatched one for the run), and the patcher that was loaded before is loaded again
afterwards (its LoRAs merged again, as Forge's next generation would).
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


def check_storage(kmodel) -> None:
    """Refuse UNet weights Forge keeps quantised ("Diffusion in Low Bits": NF4, FP4, GGUF) or as scaled FP8: the
    trainer adds ΔW to plain weights, which these are not."""
    storage = getattr(kmodel, "storage_dtype", None)
    scaled = any(getattr(m, "scale_weight", None) is not None for m in kmodel.diffusion_model.modules())
    if not isinstance(storage, torch.dtype) or scaled:
        held = f"as {storage}" if not isinstance(storage, torch.dtype) else "as scaled FP8"
        raise LohatrainError(
            f"Forge holds this UNet {held}, which training cannot add to: set Forge's 'Diffusion in Low Bits' to "
            "Automatic (or a float type) and load an unquantised checkpoint")


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
    check_storage(original.model)
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

    # Previews sample `forge_objects.unet`: the unpatched one for the run, so they show the network alone.
    current = sd_model.forge_objects.unet
    sd_model.forge_objects.unet = original
    try:
        load_unet()
        yield load_unet
    finally:
        sd_model.forge_objects.unet = current
        if before is not None and before is not original:
            with torch.inference_mode():
                memory_management.load_models_gpu([before])
