"""Forge 2 as a host (lllyasviel/stable-diffusion-webui-forge, read at dfdcbab; reForge's Forge 2 branch too): A1111's
`modules` API on Forge's own `backend`. What differs from A1111:

- the model: `shared.sd_model` is a `ForgeDiffusionEngine`, loaded lazily (a `FakeInitialModel` until
  `sd_models.forge_model_reload()`, which txt2img calls first and which returns at once when the chosen checkpoint is
  loaded); choosing a checkpoint is `modules_forge.main_entry.checkpoint_change(title)` then that reload, and the
  checkpoints its top bar lists are `main_entry.refresh_models()`'s (names, not A1111's titles). Its parts are
  in `forge_objects`: the UNet at `unet.model.diffusion_model` (ldm's module names and block classes, Forge's layer
  classes: its `Linear` is not an `nn.Linear`), the schedule and prediction type at `unet.model.predictor`, the text
  encoders at `clip.cond_stage_model`, the VAE at `vae.first_stage_model`;
- everything runs under `torch.inference_mode` (loading, the text path, the VAE): conditioning and latents are
  cloned into ordinary tensors, and the text encoders cannot be trained; Forge's transformer blocks add into their
  input in place (`x += n`), which autograd refuses after a LayerNorm kept that input for backward, so while training
  those LayerNorms get a copy of their input (the same numbers); SDXL's size part of the vector is computed with the
  engine's own `embedder` per image;
- memory: Forge's manager moves parts between devices by itself; a run tells it what a step needs (the whole UNet on
  its device, before the first step and after each preview) and moves nothing itself;
- LoRAs are merged into the weights by the loaded patcher (`LoraLoader.refresh`). Every generation starts from
  `forge_objects_original` (the unpatched patchers) and samples `forge_objects_after_applying_lora`, which Forge's
  Lora extension sets from the prompt's `<lora:…>` tags and which a generation without extra networks (a preview)
  keeps from the last one. So for a run both are the unpatched patchers (UNet and text encoders): training starts from
  the pure checkpoint and previews show the network alone. Afterwards, as after the grid, all is put back;
- the text path's CLIP skip: `set_clip_skip(n)` on the engine (each text engine keeps `clip_skip`), for every family;
- its Lora extension keeps the files it read by name: a run that rewrote one clears that cache.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from backend import memory_management
from backend.operations import ForgeOperations
from modules import sd_models, shared

from ..errors import LohatrainError
from ..families import BY_NAME, cannot_train, unsupported_reason
from ..parts import ModelParts
from .a1111 import A1111Host

# The room a training step needs beside the UNet's weights, as a multiple of their size: activations kept for
# backward, their gradients and the optimizer's state (a rough, generous figure; Forge then unloads what it must).
STEP_MEMORY_FACTOR = 2.0
_TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


class ForgeHost(A1111Host):
    name = "Forge"
    notes = ("In Forge the text encoder is not trained (keep Text encoder LR at 0): Forge runs its whole text path "
             "under torch.inference_mode. Everything else works as in the WebUI.",)
    fp8_setting = None  # Forge's "Diffusion in Low Bits" stores the UNet alone, not what the estimate counts

    # --- the loaded model ---------------------------------------------------------------------------------------
    def is_loaded(self) -> bool:
        return hasattr(shared.sd_model, "forge_objects")

    def model_summary(self) -> dict:
        """The loaded model, or the chosen one Forge has not loaded yet; `title` is the choice of Forge's top bar
        as its list names it (checkpoint_titles), so that the tab's Base model list shows the same."""
        title = self._chosen()
        if not self.is_loaded():
            return {"name": title or "unknown", "title": title, "hash": "", "family": None, "family_name": None,
                    "problem": "Forge loads the checkpoint at the first generation; it is not loaded yet. Generate "
                               "one image, or start training (which loads it), and the model's family shows here."}
        return {**super().model_summary(), "title": title}

    def _family(self, engine):
        reason = unsupported_reason(engine, engine.forge_objects.unet.model.diffusion_model)
        if reason:
            raise cannot_train(reason)
        for name in ("sdxl", "sd2", "sd1"):
            if getattr(engine, f"is_{name}", False) and (name != "sdxl" or hasattr(engine, "embedder")):
                return BY_NAME[name]
        raise cannot_train(f"a model of a kind it does not know, {type(engine).__name__}")

    def parts(self) -> ModelParts:
        """The chosen checkpoint, loaded now if it was not yet."""
        return self.parts_of(sd_models.forge_model_reload()[0])

    def parts_of(self, engine) -> ModelParts:
        family = self._family(engine)
        objects = engine.forge_objects
        kmodel = objects.unet.model
        unet = kmodel.diffusion_model
        check_storage(kmodel)
        info = getattr(engine, "sd_checkpoint_info", None)
        text_encoder = objects.clip.cond_stage_model

        def predict(noisy, timesteps, cond):  # as Forge's KModel calls its UNet
            if family.name == "sdxl":
                return unet(noisy, timesteps.float(), context=cond["crossattn"], y=cond["vector"])
            return unet(noisy, timesteps.float(), context=cond)

        return ModelParts(
            family=family, unet=unet, vae=objects.vae.first_stage_model, text_encoder=text_encoder,
            predict=predict, prompt_encoder=self._prompt_encoder(engine),
            encode_images=lambda images: engine.get_first_stage_encoding(engine.encode_first_stage(images)).clone(),
            alphas_cumprod=kmodel.predictor.alphas_cumprod,  # Forge's zero-terminal-SNR option changes only sigmas
            v_prediction=kmodel.predictor.prediction_type == "v_prediction", text_layers=lambda: [],
            applies_clip_skip=True,
            condition_on_images=(lambda cond, sizes: _size_conditioning(engine, cond, sizes)) if family.name == "sdxl"
            else (lambda cond, sizes: cond),
            name=Path(getattr(info, "filename", "") or "unknown").name,
            hash=getattr(info, "sha256", None) or getattr(info, "shorthash", None) or "",
            root=engine, managed=True, linear_types=(nn.Linear, ForgeOperations.Linear),
            text_training_refusal=("the text encoder cannot be trained in Forge: Forge runs its whole text path "
                                   "under torch.inference_mode. Set the text-encoder learning rate to 0 (the UNet "
                                   "is trained)"),
            unet_training=lambda: _layer_norms_on_a_copy(unet))

    @contextmanager
    def session(self, parts: ModelParts) -> Iterator:
        """The checkpoint's own weights (the last generation's LoRAs off the UNet and the text encoders) and a
        `load_unet` for the trainer; Forge's LoRA state as found at the end."""
        engine = parts.root
        original = engine.forge_objects_original
        size = sum(p.numel() * p.element_size() for p in original.unet.model.diffusion_model.parameters())

        def load_unet() -> None:
            with torch.inference_mode():
                memory_management.load_models_gpu([original.unet], memory_required=int(STEP_MEMORY_FACTOR * size))
            loaded = _loaded(original.unet)
            if loaded is None or getattr(loaded, "model_accelerated", False):
                raise LohatrainError(
                    "Forge could not fit the whole UNet in GPU memory next to what a training step needs, so it "
                    "would keep part of it in CPU memory, which a training step cannot follow: lower the batch size "
                    "or the resolution, turn on gradient checkpointing, or close other programs using the GPU")

        with self._loras_kept(engine):
            engine.forge_objects = original.shallow_copy()
            engine.forge_objects_after_applying_lora = original.shallow_copy()
            load_unet()
            yield load_unet

    def loras_kept(self):
        return self._loras_kept(sd_models.forge_model_reload()[0])

    @contextmanager
    def _loras_kept(self, engine):
        """Forge's LoRA state as found, put back afterwards: the patchers in `forge_objects` and
        `forge_objects_after_applying_lora`, the Lora extension's `current_lora_hash`, and for the text encoders and
        the UNet: the patcher that was loaded is loaded again (its LoRAs merged again, as Forge's next generation
        would); a model that was not loaded is unloaded, with the LoRAs that were merged in it merged again."""
        saved = engine.forge_objects, engine.forge_objects_after_applying_lora, engine.current_lora_hash
        models = [patcher.model for patcher in _patchers(engine.forge_objects_original)]
        found = [(_loaded_patcher(model), model.lora_loader.loaded_hash) for model in models]
        try:
            yield
        finally:
            engine.forge_objects, engine.forge_objects_after_applying_lora, engine.current_lora_hash = saved
            candidates = list(zip(*(_patchers(o) for o in (*saved[:2], engine.forge_objects_original))))
            with torch.inference_mode():
                for model, (loaded, merged), patchers in zip(models, found, candidates):
                    _put_back(model, loaded, merged, patchers)

    def _encode(self, engine, prompts: list[str], skip: int):
        """Forge's engine keeps CLIP skip itself (it reads no option), and its text path runs in inference mode."""
        with _clip_skip(engine, skip):
            return _clone(engine.get_learned_conditioning(prompts))

    @staticmethod
    def _chosen() -> str:
        """The top bar's choice (its option, which a generation's override may set to a title meanwhile) by the name
        its list gives it."""
        chosen = shared.opts.data.get("sd_model_checkpoint", "") or ""
        info = sd_models.get_closet_checkpoint_match(chosen)
        if info is None:
            return chosen
        return info.short_title if shared.opts.sd_checkpoint_dropdown_use_short else info.name

    def checkpoint_titles(self) -> list[str]:
        """The list of Forge's top bar, read again as its refresh button reads it (`main_entry.refresh_models`:
        names, or short titles when its option says so, where A1111 lists titles)."""
        from modules_forge import main_entry

        return list(main_entry.refresh_models()[0])

    def _load(self, title: str, info) -> None:
        """Forge's reload_model_weights does nothing: its own choice, then its (lazy) loader."""
        from modules_forge import main_entry

        main_entry.checkpoint_change(title)
        sd_models.forge_model_reload()

    @contextmanager
    def prepare_preview(self, parts: ModelParts):
        yield  # Forge's memory manager loads the VAE and text encoders for txt2img itself

    def refresh_loras(self) -> None:
        """Forge's Lora extension also keeps the files it read by name: a run may have rewritten one."""
        super().refresh_loras()
        networks = sys.modules.get("networks")
        if networks is not None:
            networks.load_lora_state_dict.cache_clear()


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


def _clone(cond):
    """Inference-mode outputs as ordinary tensors (a clone made outside inference mode is one)."""
    return {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()


@contextmanager
def _clip_skip(engine, skip: int):
    """The engine's CLIP skip for one encoding (Forge's text engines keep it as `clip_skip`; txt2img sets it from
    the option before every generation)."""
    engines = [getattr(engine, name) for name in _TEXT_ENGINES if hasattr(engine, name)]
    saved = [e.clip_skip for e in engines]
    engine.set_clip_skip(skip)
    try:
        yield
    finally:
        for e, value in zip(engines, saved):
            e.clip_skip = value


def _size_conditioning(engine, cond: dict, sizes: list[tuple[int, ...]]) -> dict:
    """The size part of SDXL's vector, per image: Forge's embedder on height, width, crop top, crop left, target
    height, target width, in that order (as its get_learned_conditioning)."""
    vector = cond["vector"]
    values = torch.tensor(sizes, dtype=torch.float32)
    with torch.no_grad():
        embedded = torch.cat([engine.embedder(values[:, i]) for i in range(values.shape[1])], dim=1)
    text_part = vector[:, :vector.shape[1] - embedded.shape[1]]
    return {**cond, "vector": torch.cat([text_part, embedded.to(vector)], dim=1)}


@contextmanager
def _layer_norms_on_a_copy(unet: nn.Module):
    """Each LayerNorm of a transformer block normalises a copy of its input (see the module's doc); the forwards
    are instance attributes, removed on exit."""
    norms = [m for block in unet.modules() if type(block).__name__ == "BasicTransformerBlock"
             for m in block.modules() if isinstance(m, nn.LayerNorm)]
    for norm in norms:
        norm.forward = _on_a_copy(norm.forward)
    try:
        yield
    finally:
        for norm in norms:
            norm.__dict__.pop("forward", None)


def _on_a_copy(forward):
    return lambda x: forward(x.clone())


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
