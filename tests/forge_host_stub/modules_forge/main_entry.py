"""Forge 2's top bar: its checkpoint list and choice (modules_forge/main_entry.py of Forge at commit
dfdcbab685e57677014f05a3309b48cc87383167: `refresh_models`, `find_files_with_extensions`, `checkpoint_change`,
`refresh_model_loading_parameters`), on the WebUI stand-in's `modules` with Forge's `sd_models` overlay
(tests/forge_stub/forge_sd_models.py). Kept: the refresh button and every page load list the checkpoints again
(`shared_items`) as names, and the VAE / text-encoder files; a choice is saved to the options and becomes the
loading parameters, which the next generation (`sd_models.forge_model_reload`) loads. Left out: the Gradio parts, the
memory settings, the folders of Forge's own --vae-dir and --text-encoder-dir options (not in the stand-in's command
line), and what the loading parameters say of additional modules and low-bit storage (none here)."""
import os

from modules import paths, sd_models, shared, shared_items

module_list = {}


def find_files_with_extensions(base_path, extensions):
    found_files = {}
    for root, _, files in os.walk(base_path):
        for file in files:
            if any(file.endswith(ext) for ext in extensions):
                found_files[file] = os.path.join(root, file)
    return found_files


def refresh_models():
    shared_items.refresh_checkpoints()
    ckpt_list = shared_items.list_checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short)
    file_extensions = ['ckpt', 'pt', 'bin', 'safetensors', 'gguf']
    module_list.clear()
    module_paths = [
        os.path.abspath(os.path.join(paths.models_path, "VAE")),
        os.path.abspath(os.path.join(paths.models_path, "text_encoder")),
    ]
    for vae_path in module_paths:
        module_list.update(find_files_with_extensions(vae_path, file_extensions))
    return ckpt_list, module_list.keys()


def refresh_model_loading_parameters():
    checkpoint_info = sd_models.select_checkpoint()
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info, additional_modules=[],
                                                         unet_storage_dtype=None)


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    """ checkpoint name can be a number of valid aliases. Returns True if checkpoint changed. """
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get('sd_model_checkpoint', ''))
    if new_ckpt_info == current_ckpt_info:
        return False
    shared.opts.set('sd_model_checkpoint', ckpt_name)
    if save:
        shared.opts.save(shared.config_filename)
    if refresh:
        refresh_model_loading_parameters()
    return True
