"""reForge `main`'s loaded model during a run: its memory manager and its LoRA patches (Forge's first backend,
`ldm_patched`, read at Panchovix/stable-diffusion-webui-reForge 3b56b26). The host adapter (lohatrain/webui/host.py)
passes in `ldm_patched.modules.model_management`; this module imports nothing of reForge's.

- reForge's Lora extension does not change weights itself: it sets `forge_objects.unet` and `.clip` (and
  `forge_objects_after_applying_lora`, which txt2img samples) to clones of the unpatched patchers with the file's
  patches; loading a clone (`load_models_gpu`, under `torch.inference_mode`; the text path loads
  `forge_objects.clip.patcher` for every prompt) merges them into the weights, keeping the checkpoint's in a backup
  shared by every clone, and they stay merged until another clone is loaded. A1111's `networks` restore
  (lohatrain.webui.host.take_off_networks) finds nothing to undo there. So a run loads the unpatched patchers
  (`forge_objects_original`), which puts the backups back, and gives them to the caption encoding and the previews;
  at the end the patchers that were loaded before are loaded again (their LoRAs merged again, as reForge's next
  generation would) and the previews' patchers are as found (`loras_kept`, which the grid uses too).
- the manager moves the UNet to CPU memory when something else needs the room (the VAE for an image, the text
  encoder for a prompt), or loads it only in part ("lowvram": the rest stays in CPU memory and is copied in layer by
  layer). A run tells it the whole UNet must be on its device, with room for a step, before the first step and after
  every preview; a part left in CPU memory stops the run with a one-line reason.
- its moves run under inference mode, so the weights may be inference tensors: the trainer's ModelGuard trains on
  ordinary views of the same memory and puts the same tensor objects back.
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from .errors import LohatrainError

# The room a training step needs beside the UNet's weights, as a multiple of their size (as for Forge 2:
# lohatrain.forge.model.STEP_MEMORY_FACTOR).
STEP_MEMORY_FACTOR = 2.0
# What the tab offers that reForge cannot do, and why (the tab shows these under the loaded checkpoint).
REFORGE_NOTES = ("In reForge the SDXL text encoders are not trained (keep Text encoder LR at 0 on SDXL): both are "
                 "transformers CLIPs there, which lohatrain's SDXL text-encoder training does not cover. Everything "
                 "else works as in the WebUI.",)


def is_reforge_host() -> bool:
    """reForge `main`: Forge's `modules_forge` on its first backend, `ldm_patched` (Forge 2 has `backend` instead)."""
    try:
        return (importlib.util.find_spec("modules_forge") is not None
                and importlib.util.find_spec("ldm_patched") is not None)
    except ModuleNotFoundError:
        return False


def _loaded_entry(memory, model):
    """The manager's entry for a patcher of this model (any clone), or None when the model is not loaded."""
    return next((m for m in memory.current_loaded_models if m.model is not None and m.model.model is model), None)


def _patchers(objects) -> tuple:
    """The patchers a generation loads whose LoRAs reForge merges into weights: the text encoder's, the UNet's."""
    return objects.clip.patcher, objects.unet


def _unpatched(objects, original):
    """`objects` with the unpatched UNet and text encoder (the checkpoint's own), as a prompt without `<lora:…>`
    leaves them."""
    copy = objects.shallow_copy()
    copy.unet, copy.clip = original.unet, original.clip
    return copy


@contextmanager
def loras_kept(sd_model, memory) -> Iterator[None]:
    """reForge's LoRA state as found, put back afterwards (after a run, or lohatrain's grid, whose `<lora:…>` cells
    leave the last cell's file merged and sampled by the next generation): the objects txt2img starts from and
    samples, the Lora extension's `current_lora_hash` (which would otherwise skip rebuilding for the last cell's
    tags), and for the text encoder and the UNet the patcher that was loaded, loaded again (its LoRAs merged again,
    as reForge's next generation would), or the model unloaded (which unpatches it), if it was not loaded."""
    saved = sd_model.forge_objects, sd_model.forge_objects_after_applying_lora, sd_model.current_lora_hash
    models = [patcher.model for patcher in _patchers(sd_model.forge_objects_original)]
    found = [getattr(_loaded_entry(memory, model), "model", None) for model in models]
    try:
        yield
    finally:
        sd_model.forge_objects, sd_model.forge_objects_after_applying_lora, sd_model.current_lora_hash = saved
        with torch.inference_mode():  # as reForge's own loads run
            for model, patcher in zip(models, found):
                _put_back(memory, model, patcher)


def _put_back(memory, model, patcher) -> None:
    entry = _loaded_entry(memory, model)
    if patcher is None and entry is not None:  # as the manager's `free_memory`: back to the offload device
        memory.current_loaded_models.remove(entry)
        entry.model_unload()
    elif patcher is not None and (entry is None or entry.model is not patcher):
        memory.load_models_gpu([patcher])


@contextmanager
def unet_session(sd_model, memory) -> Iterator[Callable[[], None]]:
    """For one run: the checkpoint's own UNet and text-encoder weights (the last prompt's LoRAs taken off both), the
    UNet whole on the GPU, and a `load_unet` for the trainer; reForge's LoRA state as found at the end
    (`loras_kept`)."""
    original = sd_model.forge_objects_original
    base_model = original.unet.model
    size = memory.module_size(base_model.diffusion_model)

    def load_unet() -> None:
        with torch.inference_mode():  # as reForge's own loads run: what it moves becomes inference tensors
            memory.load_models_gpu([original.unet], memory_required=int(STEP_MEMORY_FACTOR * size))
        if base_model.model_lowvram or base_model.device != original.unet.load_device:
            raise LohatrainError(
                "reForge could not fit the whole UNet in GPU memory next to what a training step needs, so it would "
                "keep part of it in CPU memory, which a training step cannot follow: lower the batch size or the "
                "resolution, turn on gradient checkpointing, or close other programs using the GPU")

    with loras_kept(sd_model, memory):
        # reForge's text path loads `forge_objects.clip.patcher` and txt2img samples `forge_objects_after_applying_lora`
        # (the last prompt's LoRAs, even for the previews, which turn extra networks off): the unpatched patchers for
        # the run, so captions encode and previews show the checkpoint with the network alone.
        sd_model.forge_objects = _unpatched(sd_model.forge_objects, original)
        sd_model.forge_objects_after_applying_lora = _unpatched(sd_model.forge_objects_after_applying_lora, original)
        with torch.inference_mode():  # the text encoder's merged LoRA out of its weights before anything reads them
            memory.load_models_gpu([original.clip.patcher])
        load_unet()
        yield load_unet
