"""reForge `main` as a host (Panchovix/stable-diffusion-webui-reForge, read at 3b56b26): A1111's `modules` and model
object, filled with the parts of Forge's first backend, `ldm_patched` (`modules_forge/forge_loader.py`,
`load_model_for_a1111`). What differs from A1111:

- the model: `model.diffusion_model` is ldm_patched's UNet, `first_stage_model` its VAE's, the text encoders are
  ldm_patched's transformers CLIPs inside A1111-style wrappers, and `forge_objects` holds the patchers its memory
  manager loads. `encode_first_stage` runs under `torch.inference_mode`: latents are cloned into ordinary tensors.
  SD 2.x: the OpenCLIP embedder's `model` is a placeholder and its `transformer` a transformers `CLIPTextModel` (the
  checkpoint's `clip_h`), and reForge leaves `is_sd2` False: the family is told by that embedder, and the text
  encoder is trained as SD1's, under the same kohya keys, which reForge's ComfyUI-derived loader maps onto `clip_h`.
  SDXL: both text encoders are transformers CLIPs there, which lohatrain's SDXL text-encoder path does not cover;
- LoRAs: reForge's Lora extension sets `forge_objects.unet` and `.clip` (and `forge_objects_after_applying_lora`,
  which txt2img samples even with extra networks off) to clones of the unpatched patchers with the file's patches;
  loading a clone (`load_models_gpu`, under inference mode; the text path loads `forge_objects.clip.patcher` for
  every prompt) merges them into the weights, keeping the checkpoint's in a backup shared by every clone, and they
  stay merged until another clone is loaded. So a run loads the unpatched patchers (`forge_objects_original`),
  which puts the backups back, and gives them to the caption encoding and the previews; at the end the patchers
  that were loaded before are loaded again (their LoRAs merged again, as reForge's next generation would);
- memory: the manager moves the UNet to CPU memory when something else needs the room (the VAE for an image, the
  text encoder for a prompt), or loads it only in part ("lowvram": the rest stays in CPU memory and is copied in
  layer by layer). A run tells it the whole UNet must be on its device, with room for a step, before the first step
  and after every preview; a part left in CPU memory stops the run with a one-line reason. Its moves run under
  inference mode, so the weights may be inference tensors (the trainer's ModelGuard handles those);
- its Lora extension keeps the files it read by name: a run that rewrote one clears that cache.
"""
from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager

import torch
from torch import nn

from ldm_patched.modules import model_management
from modules import shared

from ..errors import LohatrainError
from ..families import SD2, detect
from ..families.sd1 import clip_layers
from ..parts import ModelParts
from .a1111 import A1111Host

# The room a training step needs beside the UNet's weights, as a multiple of their size (as for Forge 2).
STEP_MEMORY_FACTOR = 2.0


class ReForgeHost(A1111Host):
    name = "reForge"
    notes = ("In reForge the SDXL text encoders are not trained (keep Text encoder LR at 0 on SDXL): both are "
             "transformers CLIPs there, which lohatrain's SDXL text-encoder training does not cover. Everything "
             "else works as in the WebUI.",)
    fp8_setting = None  # reForge holds weights through its own backend: A1111's FP8 option is not what it does

    def __init__(self, memory=model_management):
        self.memory = memory

    def _family(self, model):
        return SD2 if _sd2_transformer(model) is not None and not getattr(model, "is_sdxl", False) else detect(model)

    def parts_of(self, model) -> ModelParts:
        parts = super().parts_of(model)
        changes = dict(managed=True, encode_images=lambda images: parts.family.encode_images(model, images).clone())
        if parts.family.name == "sd2":
            transformer = _sd2_transformer(model)
            changes.update(text_encoder=transformer, text_layers=lambda: clip_layers(transformer, "lora_te_"))
        if parts.family.name == "sdxl":
            changes["text_training_refusal"] = (
                "the text encoders cannot be trained on SDXL in reForge: both are transformers CLIPs there, which "
                "lohatrain's SDXL text-encoder training does not cover. Set the text-encoder learning rate to 0 (the "
                "UNet is trained)")
        return dataclasses.replace(parts, **changes)

    @contextmanager
    def session(self, parts: ModelParts):
        """The checkpoint's own UNet and text-encoder weights (the last prompt's LoRAs off both), the UNet whole on
        the GPU, and a `load_unet` for the trainer; reForge's LoRA state as found at the end."""
        model, memory = parts.root, self.memory
        original = model.forge_objects_original
        base_model = original.unet.model
        size = memory.module_size(base_model.diffusion_model)

        def load_unet() -> None:
            with torch.inference_mode():  # as reForge's own loads run: what it moves becomes inference tensors
                memory.load_models_gpu([original.unet], memory_required=int(STEP_MEMORY_FACTOR * size))
            if base_model.model_lowvram or base_model.device != original.unet.load_device:
                raise LohatrainError(
                    "reForge could not fit the whole UNet in GPU memory next to what a training step needs, so it "
                    "would keep part of it in CPU memory, which a training step cannot follow: lower the batch size "
                    "or the resolution, turn on gradient checkpointing, or close other programs using the GPU")

        with self._loras_kept(model):
            # reForge's text path loads `forge_objects.clip.patcher` and txt2img samples
            # `forge_objects_after_applying_lora`: the unpatched patchers for the run, so captions encode and previews
            # show the checkpoint with the network alone.
            model.forge_objects = _unpatched(model.forge_objects, original)
            model.forge_objects_after_applying_lora = _unpatched(model.forge_objects_after_applying_lora, original)
            with torch.inference_mode():  # the text encoder's merged LoRA out of its weights before anything reads it
                memory.load_models_gpu([original.clip.patcher])
            load_unet()
            yield load_unet

    def loras_kept(self):
        return self._loras_kept(shared.sd_model)

    @contextmanager
    def _loras_kept(self, model):
        """reForge's LoRA state as found, put back afterwards (after a run, or the grid, whose `<lora:…>` cells leave
        the last cell's file merged and sampled by the next generation): the objects txt2img starts from and
        samples, the Lora extension's `current_lora_hash` (which would otherwise skip rebuilding for the last cell's
        tags), and for the text encoder and the UNet the patcher that was loaded, loaded again (its LoRAs merged
        again, as reForge's next generation would), or the model unloaded (which unpatches it), if it was not."""
        memory = self.memory
        saved = model.forge_objects, model.forge_objects_after_applying_lora, model.current_lora_hash
        models = [patcher.model for patcher in _patchers(model.forge_objects_original)]
        found = [getattr(_loaded_entry(memory, m), "model", None) for m in models]
        try:
            yield
        finally:
            model.forge_objects, model.forge_objects_after_applying_lora, model.current_lora_hash = saved
            with torch.inference_mode():  # as reForge's own loads run
                for m, patcher in zip(models, found):
                    entry = _loaded_entry(memory, m)
                    if patcher is None and entry is not None:  # as the manager's `free_memory`: to the offload device
                        memory.current_loaded_models.remove(entry)
                        entry.model_unload()
                    elif patcher is not None and (entry is None or entry.model is not patcher):
                        memory.load_models_gpu([patcher])

    @contextmanager
    def prepare_preview(self, parts: ModelParts):
        yield  # reForge's memory manager loads the VAE and text encoder for txt2img itself

    def refresh_loras(self) -> None:
        """reForge's Lora extension also keeps the files it read by name: a run may have rewritten one."""
        super().refresh_loras()
        networks = sys.modules.get("networks")
        if networks is not None:
            networks.load_lora_state_dict.cache_clear()


def _sd2_transformer(model) -> nn.Module | None:
    """The transformers CLIP inside reForge's SD 2.x wrapper (ldm's `FrozenOpenCLIPEmbedder`), or None."""
    wrapped = getattr(getattr(model, "cond_stage_model", None), "wrapped", None)
    if type(wrapped).__name__ != "FrozenOpenCLIPEmbedder":
        return None
    transformer = getattr(wrapped, "transformer", None)
    return transformer if isinstance(transformer, nn.Module) and hasattr(transformer, "text_model") else None


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
