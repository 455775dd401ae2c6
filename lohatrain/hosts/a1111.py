"""AUTOMATIC1111's WebUI v1.10.x as a host: its `modules` API, and its built-in Lora extension (`networks`).

Read off v1.10.1 (AUTOMATIC1111/stable-diffusion-webui, tag v1.10.1): the loaded model is `shared.sd_model`, an ldm
LatentDiffusion (SD1, SD2) or sgm DiffusionEngine (SDXL), so its parts are its family's (`families.ldm_parts`), with
the host's own text path for captions (its CLIP-skip and emphasis options, prompt chunking, embeddings). Its Lora
extension merges a prompt's networks into the weights in place, with a backup, and re-checks them at every layer's
forward: a run restores the backups and clears the list, and the next prompt that names a network applies it again.
Forge and reForge keep this `modules` API; their files in this folder change what differs.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from modules import call_queue, devices, processing, scripts, sd_models, sd_samplers, shared

from ..errors import LohatrainError
from ..families import detect
from ..parts import ModelParts
from ..settings import TrainSettings
from .base import Host

SETTINGS_SECTION = ("lohatrain", "LoRA training")
# The host's own tag options (Settings → Interrogate), which the tab shows and may change for one pass.
TAG_OPTIONS = ("interrogate_deepbooru_score_threshold", "deepbooru_sort_alpha", "deepbooru_use_spaces",
               "deepbooru_escape")


class A1111Host(Host):
    name = "AUTOMATIC1111"
    # The option takes effect when the weights are loaded (sd_models.reload_model_weights reloads on a change).
    fp8_setting = ("Settings → Optimizations → FP8 weight (Enable, or Enable for SDXL), then load the checkpoint "
                   "again")

    def register_settings(self) -> None:
        """The extension's section in the WebUI's Settings tab."""
        add = shared.opts.add_option
        add("lohatrain_lora_subfolder", shared.OptionInfo(
            "", "Sub-folder of the Lora folder for trained files (empty: the Lora folder itself)",
            section=SETTINGS_SECTION))
        add("lohatrain_previews", shared.OptionInfo(
            True, "Make preview images while training (when 'preview every N steps' is set)", section=SETTINGS_SECTION))
        # restrict_api: the WebUI's /sdapi/v1/options cannot change these two (the host's own rule for options
        # that would open the machine to the network).
        add("lohatrain_allow_any_path", shared.OptionInfo(
            False, "Allow dataset folders outside the WebUI folder even when the WebUI listens on the network "
            "without a password", section=SETTINGS_SECTION, restrict_api=True))
        add("lohatrain_allow_unauthenticated_api", shared.OptionInfo(
            False, "Answer lohatrain's REST API (/lohatrain/v1/*) when the WebUI listens on the network without "
            "--api-auth", section=SETTINGS_SECTION, restrict_api=True))

    # --- the loaded model ---------------------------------------------------------------------------------------
    def model_summary(self) -> dict:
        model = shared.sd_model
        info = getattr(model, "sd_checkpoint_info", None)
        try:
            family = self._family(model)
            label, family_name, problem = family.label, family.name, None
        except LohatrainError as e:
            label, family_name, problem = None, None, str(e)
        return {"name": getattr(info, "name_for_extra", None) or getattr(info, "name", "unknown"),
                "title": getattr(info, "title", ""), "hash": getattr(info, "shorthash", None) or "",
                "family": label, "family_name": family_name, "problem": problem}

    def _family(self, model):
        return detect(model)

    def parts(self) -> ModelParts:
        return self.parts_of(shared.sd_model)

    def parts_of(self, model) -> ModelParts:
        """The engine's view of this host's model object."""
        family = self._family(model)
        info = getattr(model, "sd_checkpoint_info", None)
        applies = family.applies_clip_skip
        if family.name == "sdxl":  # Settings → "Clip skip SDXL" makes the host apply it to CLIP-L
            applies = bool(getattr(shared.opts, "sdxl_clip_l_skip", False))
        return dataclasses.replace(
            family.parts(model), prompt_encoder=self._prompt_encoder(model), applies_clip_skip=applies,
            name=Path(getattr(info, "filename", "") or "unknown").name,
            hash=getattr(info, "sha256", None) or getattr(info, "shorthash", None) or "")

    def _prompt_encoder(self, model):
        """The host's conditioning path at a CLIP skip, captions taken literally: with emphasis "None" the host
        does not parse `(word:1.2)` or BREAK, so captions with brackets (common in booru tags) are trained as
        written; chunking past 75 tokens and embeddings work as at inference."""
        def for_skip(clip_skip: int | None):
            skip = clip_skip if clip_skip is not None else self.clip_skip()

            def encode(prompts: list[str]):
                with options_for_this_thread(CLIP_stop_at_last_layers=skip, emphasis="None"):
                    return self._encode(model, prompts, skip)

            return encode

        return for_skip

    def _encode(self, model, prompts: list[str], skip: int):
        return model.get_learned_conditioning(prompts)

    @contextmanager
    def session(self, parts: ModelParts):
        self._take_off_networks()
        yield None

    @contextmanager
    def loras_kept(self):
        try:
            yield
        finally:
            self._take_off_networks()  # the last cell's file is merged into the weights: take it off

    def _take_off_networks(self) -> None:
        """Undo every network the host merged into the weights (UNet and text encoders), so a run starts from the
        pure checkpoint; clearing the layers' applied-set makes the next prompt that names them apply them again."""
        networks = sys.modules.get("networks")
        if networks is None:
            return
        with torch.no_grad():  # the host's restore is an in-place copy into weights that require grad
            for module in shared.sd_model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)):
                    networks.network_restore_weights_from_backup(module)
                    if hasattr(module, "network_current_names"):
                        module.network_current_names = ()
        networks.loaded_networks.clear()

    def checkpoint_titles(self) -> list[str]:
        sd_models.list_models()
        return list(sd_models.checkpoint_tiles())

    def load_checkpoint(self, title: str) -> None:
        info = sd_models.get_closet_checkpoint_match(title)
        if info is None:
            raise LohatrainError(f"checkpoint {title!r} was not found; press refresh in the WebUI")
        with call_queue.queue_lock:  # reload_model_weights records the choice in opts itself
            self._load(title, info)

    def _load(self, title: str, info) -> None:
        sd_models.reload_model_weights(info=info)

    def check_memory_mode(self) -> None:
        o = shared.cmd_opts
        # --medvram-sdxl is --medvram for SDXL models only (the host's lowvram.is_needed: a model with a conditioner)
        sdxl_medvram = getattr(o, "medvram_sdxl", False) and hasattr(shared.sd_model, "conditioner")
        if getattr(o, "lowvram", False) or getattr(o, "medvram", False) or sdxl_medvram:
            raise LohatrainError(
                "lohatrain cannot train while the WebUI runs with --lowvram or --medvram (or --medvram-sdxl with an "
                "SDXL model loaded): those modes move parts of the model between CPU and GPU inside every forward "
                "pass, which a training step's backward pass cannot follow. Start the WebUI without them; with "
                "gradient checkpointing, SD1 trains in 8 GB.")

    # --- generation -----------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, settings: TrainSettings, seed: int, extra_networks: bool) -> list:
        """The checkpoint is pinned: a new choice in the quick settings must not load into this model meanwhile."""
        title = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "title", None)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, seed=seed, steps=settings.preview_steps,
            sampler_name=settings.preview_sampler, scheduler="Automatic", width=settings.resolution,
            height=settings.resolution, do_not_save_grid=True, do_not_save_samples=True,
            override_settings={"sd_model_checkpoint": title})
        p.disable_extra_networks = not extra_networks
        # reForge's processing reads `p.scripts` unchecked: a runner as the host's txt2img route gives one, but with
        # no scripts, so other extensions' always-on scripts (ControlNet, ADetailer…) leave previews and cells alone.
        p.scripts = scripts.ScriptRunner()
        return processing.process_images(p).images

    def sampler_names(self) -> list[str]:
        return sd_samplers.visible_sampler_names()

    def check_sampler(self, name: str) -> None:
        if sd_samplers.find_sampler_config(name) is None:
            raise LohatrainError(f"preview_sampler {name!r} is not one of the WebUI's samplers: "
                                 f"{', '.join(self.sampler_names())}")

    @contextmanager
    def prepare_preview(self, parts: ModelParts):
        """The trainer moved the VAE and (with cached captions) the text encoders off the GPU: back for txt2img."""
        moved = [parts.vae, parts.text_encoder]
        devices_before = [next(part.parameters()).device for part in moved]
        for part in moved:
            part.to(next(parts.unet.parameters()).device)
        try:
            yield
        finally:
            for part, device in zip(moved, devices_before):
                part.to(device)

    # --- the WebUI around it ------------------------------------------------------------------------------------
    def gpu_queue(self):
        return call_queue.queue_lock

    @property
    def state(self):
        return shared.state

    def lora_dir(self) -> Path:
        sub = str(getattr(shared.opts, "lohatrain_lora_subfolder", "") or "").strip()
        base = Path(shared.cmd_opts.lora_dir)
        if sub:
            sub_path = Path(sub)
            if sub_path.is_absolute() or ".." in sub_path.parts:
                raise LohatrainError(f"the Lora sub-folder setting {sub!r} must be a plain relative folder name")
            return base / sub_path
        return base

    def refresh_loras(self) -> None:
        networks = sys.modules.get("networks")
        if networks is not None:
            networks.list_available_networks()

    def clip_skip(self) -> int:
        return int(shared.opts.CLIP_stop_at_last_layers)

    def option(self, name: str, default=None):
        return getattr(shared.opts, name, default)

    def device_defaults(self) -> dict:
        """On the CPU (`--use-cpu all`) fp32 trains about twice as fast as fp16, which the CPU emulates."""
        return {"train_dtype": "fp32"} if torch.device(devices.device).type == "cpu" else {}

    def access(self) -> dict:
        o = shared.cmd_opts
        exposed = bool(getattr(o, "listen", False) or getattr(o, "share", False) or getattr(o, "ngrok", None)
                       or getattr(o, "server_name", None))
        return {"exposed": exposed, "gradio_auth": getattr(o, "gradio_auth", None),
                "api_auth": getattr(o, "api_auth", None), "root": getattr(shared, "data_path", None)}

    @contextmanager
    def tagger(self, which: str, tag_options: dict):
        """DeepBooru (`deepbooru.model`, started once and stopped at the end, which moves it off the GPU as the
        host's own batch captioning does) or the interrogator (`shared.interrogator.interrogate`, which loads and
        unloads BLIP and CLIP itself), with the pass's tag options for this thread only."""
        from modules import deepbooru
        started = False

        def tag(image) -> str:
            nonlocal started
            with options_for_this_thread(**tag_options):
                if which == "interrogator":
                    return shared.interrogator.interrogate(image.convert("RGB"))
                if not started:
                    deepbooru.model.start()
                    started = True
                return deepbooru.model.tag_multi(image)

        try:
            yield tag
        finally:
            if started:
                deepbooru.model.stop()

    def tag_options(self) -> dict:
        return {key: getattr(shared.opts, key) for key in TAG_OPTIONS}

    def label_grid(self, cells: list, columns: list[str], rows: list[str]):
        from modules import images

        width, height = cells[0].size
        return images.draw_grid_annotations(
            images.image_grid(cells, rows=len(rows)), width, height,
            [[images.GridAnnotation(label)] for label in columns], [[images.GridAnnotation(label)] for label in rows])


_this_thread = threading.local()


@contextmanager
def options_for_this_thread(**values):
    """Option values the host's text path reads (`opts.X`, through Options.__getattr__) for this thread only.

    The training thread needs its CLIP skip and emphasis "None" while it encodes captions; writing them into
    `opts.data` would show them to every request running meanwhile, and a Settings save could persist them.
    So `shared.opts` gets (once) a subclass whose attribute reads look at this thread's values first; every
    other read, `opts.data` and what Settings saves are unchanged.
    """
    options = shared.opts
    if not getattr(type(options), "lohatrain_thread_overlay", False):
        options.__class__ = _thread_overlay(type(options))
    previous = getattr(_this_thread, "options", None)
    _this_thread.options = {**(previous or {}), **values}
    try:
        yield
    finally:
        _this_thread.options = previous


def _thread_overlay(base: type) -> type:
    class ThreadOverlayOptions(base):
        lohatrain_thread_overlay = True

        def __getattr__(self, item):
            values = getattr(_this_thread, "options", None)
            if values and item in values:
                return values[item]
            return super().__getattr__(item)

    return ThreadOverlayOptions
