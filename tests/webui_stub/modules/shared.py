"""`modules.shared`: cmd_opts, opts, state, sd_model and a few helpers, set up at import (the host does it in
shared_init.initialize()).

`shared.sd_model` is a property as in the host: reading it loads the selected checkpoint if no model was ever
loaded (a failure prints and gives None); assigning it makes that model the current one.
Ports modules/shared.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import os
import re
import sys

from modules import options, shared_cmd_options
from modules.paths_internal import (data_path, default_sd_model_file, extensions_builtin_dir, extensions_dir,  # noqa: F401
                                    models_path, script_path, sd_model_file)

cmd_opts = shared_cmd_options.cmd_opts
parser = shared_cmd_options.parser
config_filename = cmd_opts.ui_settings_file

parallel_processing_allowed = True
demo = None
device = None

OptionInfo = options.OptionInfo
options_section = options.options_section

options_templates = {}
options_templates.update(options_section(("sd", "Stable Diffusion", "sd"), {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint", infotext="Model hash"),
    "sd_checkpoints_limit": OptionInfo(1, "Maximum number of checkpoints loaded at the same time"),
    "sd_checkpoint_cache": OptionInfo(0, "Checkpoints to cache in RAM"),
    "emphasis": OptionInfo("Original", "Emphasis mode", infotext="Emphasis"),
    "comma_padding_backtrack": OptionInfo(20, "Prompt word wrap length limit"),
    "sdxl_clip_l_skip": OptionInfo(False, "Clip skip SDXL"),
    "sd_checkpoint_dropdown_use_short": OptionInfo(False, "Checkpoint dropdown: use filenames without paths"),
    "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip", infotext="Clip skip"),
}))
options_templates.update(options_section(("sdxl", "Stable Diffusion XL", "sd"), {
    "sdxl_crop_top": OptionInfo(0, "crop top coordinate"),
    "sdxl_crop_left": OptionInfo(0, "crop left coordinate"),
    "sdxl_refiner_low_aesthetic_score": OptionInfo(2.5, "SDXL low aesthetic score"),
    "sdxl_refiner_high_aesthetic_score": OptionInfo(6.0, "SDXL high aesthetic score"),
}))
options_templates.update(options_section(("system", "System", "system"), {
    "list_hidden_files": OptionInfo(True, "Load models/files in hidden directories"),
    "hide_samplers": OptionInfo([], "Hide samplers in user interface"),
}))
options_templates.update(options_section(("saving-images", "Saving images/grids", "saving"), {
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "grid_save": OptionInfo(True, "Always save all generated image grids"),
    "grid_only_if_multiple": OptionInfo(True, "Do not save grids consisting of one picture"),
    "grid_prevent_empty_spots": OptionInfo(False, "Prevent empty spots in grid (when set to autodetect)"),
    "grid_text_active_color": OptionInfo("#000000", "Text color for image grids"),
    "grid_text_inactive_color": OptionInfo("#999999", "Inactive text color for image grids"),
    "grid_background_color": OptionInfo("#ffffff", "Background color for image grids"),
    "n_rows": OptionInfo(-1, "Grid row count; use -1 for autodetect and 0 for it to be same as batch size"),
    "return_grid": OptionInfo(True, "Show grid in gallery"),
    "enable_pnginfo": OptionInfo(True, "Write infotext to metadata of the generated image"),
}))
options_templates.update(options_section(("ui", "Live previews", "ui"), {
    "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
    "live_previews_image_format": OptionInfo("png", "Live preview file format"),
    "show_progress_grid": OptionInfo(True, "Show previews of all images generated in a batch as a grid"),
    "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
}))
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    # registered by the Lora extension's lora_script.py in the host
    "sd_lora": OptionInfo("None", "Add network to prompt"),
    "lora_preferred_name": OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
    "lora_add_hashes_to_infotext": OptionInfo(True, "Add Lora hashes to infotext"),
    "lora_in_memory_limit": OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "lora_not_found_warning_console": OptionInfo(False, "Lora not found warning in console"),
}))
options_templates.update(options_section(("interrogate", "Interrogate"), {
    "interrogate_keep_models_in_memory": OptionInfo(False, "Keep models in VRAM"),
    "interrogate_return_ranks": OptionInfo(False, "Include ranks of model tags matches in results."),
    "interrogate_deepbooru_score_threshold": OptionInfo(0.5, "deepbooru: score threshold"),
    "deepbooru_sort_alpha": OptionInfo(True, "deepbooru: sort tags alphabetically"),
    "deepbooru_use_spaces": OptionInfo(True, "deepbooru: use spaces in tags"),
    "deepbooru_escape": OptionInfo(True, "deepbooru: escape (\\) brackets"),
    "deepbooru_filter_tags": OptionInfo("", "deepbooru: filter out those tags"),
}))
options_templates.update(options_section((None, "Hidden options"), {
    "sd_checkpoint_hash": OptionInfo("", "SHA256 hash of the current checkpoint"),
}))
restricted_opts = set()
opts = options.Options(options_templates, restricted_opts)

# As the host's initialize_util: choosing a checkpoint in settings reloads the model inside the GPU queue.
# The queue lock is not reentrant: calling opts.set("sd_model_checkpoint", ...) while holding
# call_queue.queue_lock deadlocks, in the host as here.
def _reload_on_checkpoint_change():
    from modules import call_queue, sd_models
    call_queue.wrap_queued_call(lambda: sd_models.reload_model_weights())()


opts.onchange("sd_model_checkpoint", _reload_on_checkpoint_change, call=False)

from modules import devices, shared_state  # noqa: E402

device = devices.device
state = shared_state.State()


def natural_sort_key(s, regex=re.compile('([0-9]+)')):
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def walk_files(path, allowed_extensions=None):
    if not os.path.exists(path):
        return
    allowed = set(allowed_extensions) if allowed_extensions is not None else None
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda x: natural_sort_key(x[0])):
        for filename in sorted(files, key=natural_sort_key):
            if allowed is not None and os.path.splitext(filename)[1].lower() not in allowed:
                continue
            if not opts.list_hidden_files and ("/." in root or "\\." in root):
                continue
            yield os.path.join(root, filename)


class Shared(sys.modules[__name__].__class__):
    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared

from modules import interrogate  # noqa: E402

interrogator = interrogate.InterrogateModels(os.path.join(script_path, "interrogate"))  # shared_init.py; the host's is cwd-relative
