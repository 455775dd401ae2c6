"""Forge's Lora extension, networks.py (commit dfdcbab): how `<lora:name:w>` reaches the UNet.

`load_networks(names, te_multipliers, unet_multipliers)` compiles [file, unet strength, text strength, online]
per network; when that equals the engine's `current_lora_hash` nothing changes. Otherwise it starts from
`forge_objects_original`'s patchers and, per file, `load_lora_for_models`: ComfyUI's key rules map the file's keys
to the UNet's and the text encoder's parameters (`load_lora` with `model_lora_keys_unet`, `model_lora_keys_clip`),
and clones of the patchers get them as patches at the network's strengths (`add_patches`); the result becomes
`forge_objects` and `forge_objects_after_applying_lora`.
Nothing is merged here: the memory manager does it when the sampler loads the patcher. The files' tensors are kept
by file name (`load_lora_state_dict`, an lru_cache), so a file rewritten since is not read again until that cache
is cleared. `list_available_networks()` rescans the Lora folder (the Lora list's refresh).
Left out: online LoRA, bundled embeddings, `lora_functional`.
"""
import functools
import os

import network
from modules import errors, sd_models, shared
from packages_3rdparty.comfyui_lora_collection.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from safetensors.torch import load_file


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename='default', online_mode=False):
    lora_unet, lora_unmatch = load_lora(lora, model_lora_keys_unet(model.model))
    lora_clip, lora_unmatch = load_lora(lora_unmatch, model_lora_keys_clip(clip.cond_stage_model))
    if len(lora_unmatch) > 12:
        print(f'[LORA] LoRA version mismatch for {type(model.model).__name__}: {filename}')
        return model, clip
    if lora_unmatch:
        print(f'[LORA] Loading {filename} with unmatched keys {list(lora_unmatch.keys())}')
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model,
                              online_mode=online_mode)
        model = new_model
    if lora_clip:
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip,
                             online_mode=online_mode)
        clip = new_clip
    return model, clip


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename):
    return load_file(filename)


def load_network(name, network_on_disk):
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    return net


def _on_disk(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    current_sd = sd_models.model_data.get_sd_model()
    if current_sd is None:
        return
    loaded_networks.clear()
    networks_on_disk = [_on_disk(name) for name in names]
    if any(x is None for x in networks_on_disk):
        list_available_networks()
        networks_on_disk = [_on_disk(name) for name in names]
    for network_on_disk, name in zip(networks_on_disk, names):
        try:
            net = load_network(name, network_on_disk)
        except Exception as e:
            errors.display(e, f"loading network {getattr(network_on_disk, 'filename', name)}")
            continue
        net.mentioned_name = name
        loaded_networks.append(net)

    compiled_lora_targets = [[a.filename, b, c, False]
                             for a, b, c in zip(networks_on_disk, unet_multipliers, te_multipliers)]
    compiled_lora_targets_hash = str(compiled_lora_targets)
    if current_sd.current_lora_hash == compiled_lora_targets_hash:
        return
    current_sd.current_lora_hash = compiled_lora_targets_hash
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, online_mode in compiled_lora_targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename=filename, online_mode=online_mode)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()


def process_network_files(names=None):
    for filename in shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]):
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        entry = network.NetworkOnDisk(name, filename)
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


extra_network_lora = None

available_networks = {}
available_network_aliases = {}
loaded_networks = []
forbidden_network_aliases = {}

list_available_networks()
