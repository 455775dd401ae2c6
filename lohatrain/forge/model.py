"""Forge 2's loaded model during a run: its memory manager (`backend.memory_management`) and its LoRA patches.

Forge moves models between devices by itself, under `torch.inference_mode`, whenever something loads a part (its
text encoders for a prompt, its VAE for an image): a run tells it what a training step needs, the whole UNet on its
device, before the first step and after each preview. LoRAs are merged into the UNet's weights by the loaded
patcher (`LoraLoader.refresh`). Every generation starts from `forge_objects_original` (the unpatched patchers) and
samples `forge_objects_after_applying_lora`, which Forge's Lora extension sets from the prompt's `<lora:…>` tags
and which a generation without extra networks (a preview) keeps from the last one. So for a run both are the
unpatched patchers: training starts from the pure checkpoint and previews show the network alone. Afterwards, as
after the grid's generations, everything is put back (`loras_kept`).
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


def _patchers(objects) -> tuple:
    """The patchers a generation loads whose LoRAs Forge merges into weights: the text encoders', then the UNet's."""
    return objects.clip.patcher, objects.unet


def _loaded_patcher(model):
    return next((m.model for m in memory_management.current_loaded_models if m.model.model is model), None)


def _lora_hash(patcher) -> str:
    """What `LoraLoader.loaded_hash` is after this patcher's LoRAs are merged (Forge's own formula)."""
    return str(list(patcher.lora_patches.keys()))


@contextmanager
def loras_kept(sd_model) -> Iterator[None]:
    """Forge's LoRA state as found, put back afterwards: the patchers in `forge_objects` and
    `forge_objects_after_applying_lora`, the Lora extension's `current_lora_hash`, and for the text encoders and the
    UNet: the patcher that was loaded is loaded again (its LoRAs merged again, as Forge's next generation would); a
    model that was not loaded is unloaded, with the LoRAs that were merged in it merged again."""
    saved = sd_model.forge_objects, sd_model.forge_objects_after_applying_lora, sd_model.current_lora_hash
    models = [patcher.model for patcher in _patchers(sd_model.forge_objects_original)]
    found = [(_loaded_patcher(model), model.lora_loader.loaded_hash) for model in models]
    try:
        yield
    finally:
        sd_model.forge_objects, sd_model.forge_objects_after_applying_lora, sd_model.current_lora_hash = saved
        candidates = list(zip(*(_patchers(o) for o in (*saved[:2], sd_model.forge_objects_original))))
        with torch.inference_mode():
            for model, (loaded, merged), patchers in zip(models, found, candidates):
                _put_back(model, loaded, merged, patchers)


def _put_back(model, loaded, merged: str, patchers) -> None:
    if loaded is not None:
        memory_management.load_models_gpu([loaded])
        return
    for i in reversed(range(len(memory_management.current_loaded_models))):
        if memory_management.current_loaded_models[i].model.model is model:
            memory_management.current_loaded_models.pop(i).model_unload()
    if model.lora_loader.loaded_hash != merged:
        source = next((p for p in patchers if _lora_hash(p) == merged), None)
        if source is not None:
            source.refresh_loras()


@contextmanager
def unet_session(sd_model) -> Iterator[Callable[[], None]]:
    """For one run: the checkpoint's own UNet weights (LoRAs taken off) and a `load_unet` for the trainer; Forge's
    LoRA state as found at the end (`loras_kept`)."""
    original = sd_model.forge_objects_original
    check_storage(original.unet.model)
    size = sum(p.numel() * p.element_size() for p in original.unet.model.diffusion_model.parameters())

    def load_unet() -> None:
        with torch.inference_mode():
            memory_management.load_models_gpu([original.unet], memory_required=int(STEP_MEMORY_FACTOR * size))
        loaded = _loaded(original.unet)
        if loaded is None or getattr(loaded, "model_accelerated", False):
            raise LohatrainError(
                "Forge could not fit the whole UNet in GPU memory next to what a training step needs, so it would "
                "keep part of it in CPU memory, which a training step cannot follow: lower the batch size or the "
                "resolution, turn on gradient checkpointing, or close other programs using the GPU")

    with loras_kept(sd_model):
        sd_model.forge_objects = original.shallow_copy()
        sd_model.forge_objects_after_applying_lora = original.shallow_copy()
        load_unet()
        yield load_unet
