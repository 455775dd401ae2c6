"""Forge 2's checkpoint loading, as an overlay on the WebUI stand-in's `modules.sd_models` (tests/webui_stub): Forge
keeps A1111's checkpoint list (`CheckpointInfo`, `list_models`, `get_closet_checkpoint_match`) and replaces how a
model is loaded. `install(monkeypatch)` puts this module's parts in place of the stand-in's.

Written from Forge at commit dfdcbab685e57677014f05a3309b48cc87383167: modules/sd_models.py (`checkpoint_tiles`,
`select_checkpoint`, `FakeInitialModel`, `SdModelData`, `forge_model_reload`) and modules/initialize_util.py
(`configure_opts_onchange`, where Forge comments out A1111's reload on a new `sd_model_checkpoint`). Kept:
- the list Forge's top bar shows: names (short titles with `sd_checkpoint_dropdown_use_short`), not titles;
- until the first generation `shared.sd_model` is a `FakeInitialModel`; `forge_model_reload()` loads the checkpoint
  of `model_data.forge_loading_parameters` (which `main_entry.checkpoint_change` sets) unless it is the one loaded
  (`forge_hash`, the parameters' text), unloading the old model first; it records the checkpoint's info and hash on
  the new engine, runs the model_loaded callbacks and returns (model, whether it loaded one);
- choosing a checkpoint only records the choice: nothing loads until a generation or `forge_model_reload()`.
Left out: the file's weights (the stand-in's `forge_loader` builds the tiny model the file's name names, with the
WebUI stand-in's name rule and seed: tests/webui_stub/modules/sd_models.py), additional modules (VAE, text
encoders), low-bit storage, timers and prints.
"""
import math
import sys
import zlib

import torch

from backend import memory_management
from backend.loader import forge_loader
from modules import script_callbacks, sd_models, shared


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.name for x in sd_models.checkpoints_list.values()]


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = sd_models.checkpoint_aliases.get(model_checkpoint, None)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(sd_models.checkpoints_list) == 0:
        print('You do not have any model!')
        return None
    checkpoint_info = next(iter(sd_models.checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}", file=sys.stderr)
    return checkpoint_info


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        r = len(prompt.strip('!,. ').replace(' ', ',').replace('.', ',').replace('!', ',').replace(',,', ',').split(','))
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ''

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


@torch.inference_mode()
def forge_model_reload():
    model_data = sd_models.model_data
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
    checkpoint_info = model_data.forge_loading_parameters['checkpoint_info']
    if checkpoint_info is None:
        raise ValueError('You do not have any model! Please download at least one model in [models/Stable-diffusion].')
    seed = zlib.crc32(checkpoint_info.name_for_extra.encode("utf-8")) % 1000  # the stand-in's weights (see above)
    sd_model = forge_loader(sd_models._family_of_file(checkpoint_info), seed)
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True


def install(monkeypatch):
    """Forge's loading in place of the stand-in's A1111 loading, with no model loaded yet (as Forge starts)."""
    for name in ("checkpoint_tiles", "select_checkpoint", "FakeInitialModel", "SdModelData", "forge_model_reload"):
        monkeypatch.setattr(sd_models, name, globals()[name], raising=False)
    monkeypatch.setattr(sd_models, "model_data", SdModelData())
    monkeypatch.setattr(shared.opts.data_labels["sd_model_checkpoint"], "onchange", None)
