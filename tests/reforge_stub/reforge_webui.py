"""reForge `main`'s txt2img and Lora extension, as an overlay on the WebUI stand-in's `modules` (tests/webui_stub):
reForge keeps A1111's `StableDiffusionProcessingTxt2Img`, extra networks and Lora file list, and changes what they
do with the model. Tests put `process_images` in place of `modules.processing`'s and `load_networks` in place of the
A1111 `networks` module's (whose `ExtraNetworkLora.activate` calls it, as reForge's does).

Written from reForge at 3b56b26: modules/processing.py (`process_images_inner`) and extensions-builtin/Lora/networks.py
(`load_networks`). Kept:
- the pass runs under `torch.inference_mode`; each batch starts from `forge_objects = forge_objects_original
  .shallow_copy()`; every registered extra network is activated (unless `p.disable_extra_networks`), Lora with `[]`
  when the prompt names none, which makes the unpatched UNet the one sampled; then `forge_objects =
  forge_objects_after_applying_lora.shallow_copy()`: with extra networks off, the last `<lora:…>` prompt's patcher;
- the text encoder loads itself (reforge_host's CLIP wrapper), then `sampling_prepare` loads `forge_objects.unet`
  (merging its LoRAs into the UNet's weights), and the VAE loads itself to decode;
- the Lora extension: names looked up in A1111's list (refreshed for a name it does not know), the hash of [file,
  UNet multiplier, text-encoder multiplier] that skips rebuilding when it equals the last prompt's
  (reforge_host.apply_loras), and its cache of the last five files read, by name (`load_lora_state_dict`).
- `p.scripts.alwayson_scripts` is read in every batch without checking `p.scripts` (processing.py line 1065): a
  `p` without a scripts runner fails there with AttributeError.
Left out: the checkpoint reload, reForge's samplers (the WebUI stand-in's DDIM through `apply_model`), the scripts'
other hooks, hires fix, infotexts.
"""
import functools
import sys

import torch
from safetensors.torch import load_file

import reforge_host
from ldm_patched.modules import model_management
from modules import extra_networks, sd_models, shared
from modules.processing import Processed, _to_pil, get_fixed_seed
from modules.shared import opts, state


def process_images(p):
    stored_opts = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
            p.override_settings.pop("sd_model_checkpoint", None)
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)


def process_images_inner(p):
    seed, subseed = get_fixed_seed(p.seed), get_fixed_seed(p.subseed)
    model = shared.sd_model
    p.sd_model_name, p.sd_model_hash = model.sd_checkpoint_info.name_for_extra, model.sd_model_hash
    p.setup_prompts()
    p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]
    output_images = []
    with torch.inference_mode():
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            model.forge_objects = model.forge_objects_original.shallow_copy()
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds, p.subseeds = p.all_seeds[batch], p.all_subseeds[batch]
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            # reForge looks up its "advanced model sampling" script without checking that `p.scripts` is set
            next((x for x in p.scripts.alwayson_scripts if x.name == "advanced model sampling for reforge"), None)
            model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
            p.setup_conds()
            model_management.load_models_gpu([model.forge_objects.unet])  # sampling_prepare
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                               subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)
            output_images += [_to_pil(x) for x in model.decode_first_stage(samples)]
            state.nextjob()
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    return Processed(p, images_list=output_images, seed=p.all_seeds[0], subseed=p.all_subseeds[0])


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    """reForge keeps the last files it read by name (extensions-builtin/Lora/networks.py): a rewritten file is read
    again only after the cache is cleared."""
    return load_file(filename)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    networks = sys.modules["networks"]  # A1111's list of files, which reForge keeps
    networks.loaded_networks.clear()
    if any(networks._lookup(name) is None for name in names):
        networks.list_available_networks()
    files = [networks._lookup(name).filename for name in names]
    reforge_host.apply_loras(shared.sd_model, list(zip(files, unet_multipliers, te_multipliers)),
                          load_lora_state_dict)
