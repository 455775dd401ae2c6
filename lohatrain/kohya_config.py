"""Import a kohya config: the kohya_ss GUI's saved JSON, or an sd-scripts `train_network.py` TOML (`--config_file`)
with its dataset config (`--dataset_config`), as lohatrain settings.

Every option of the file ends in one of three places, so nothing is dropped without a word:
- taken: a lohatrain setting with the same meaning (names mapped, values converted; "taken with a change" says how
  when the meaning is close but not the same);
- not taken, listed by name and value in one message, grouped by why;
- quiet: at kohya's own default, or not used by kohya itself for this config (the GUI's fields of another network
  type or model family, `multires_noise_discount` without iterations…); these change nothing and are counted only.

The GUI's JSON is first read as the GUI reads it (kohya_gui/lora_gui.py `train_model`): its `LoRA_type` and
network fields become sd-scripts' `network_module` and `network_args`, `lr_warmup` (percent) a warm-up ratio, an
`epoch` count the run's length; then it is mapped as sd-scripts arguments. An sd-scripts TOML's sections are
flattened as sd-scripts does; what it leaves out is sd-scripts' default (its `--output_config` writes only what
differs), where that changes what is learnt: network_alpha 1, network_dim 4, batch 1, 1600 steps, no buckets,
captions `.caption`.

A dataset config's subsets become lohatrain's folders: lohatrain reads kohya's repeats from `N_name` sub-folder
names, so the training subsets are taken only when they are sub-folders of one folder, each named with its own
num_repeats (`10_alice` for num_repeats 10), or a single subset with num_repeats 1 (a flat folder); the
regularization subsets (`is_reg`) likewise. Otherwise the subsets are listed as not taken, with how to lay them out.
Options lohatrain sets for the whole run (flip_aug, keep_tokens…) are taken when every subset agrees.

Epochs become steps (lohatrain counts steps) from the dataset folder's images × repeats (twice that with
regularization images, as kohya draws as many), divided by the batch size: when the folder cannot be read, the
epochs are listed as not taken.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import toml

from . import dataset as ds
from . import optimizers
from .errors import LohatrainError
from .settings import SettingsError, TrainSettings
from .targets import TARGETS

FIELDS = {f.name for f in dataclasses.fields(TrainSettings)}
# kohya's dataset shapes (N_name folders with repeats, a regularization folder): issue 21's dataset settings
KOHYA_FOLDERS = "reg_data_dir" in FIELDS
REPEATS_FOLDER = re.compile(r"(\d+)_(.*)", re.DOTALL)

# The groups of the options not taken, in the message's order.
OWN_WAY = "lohatrain does these its own way (the loaded model, caching, attention, data loading, launching, logging)"
NO_EQUIVALENT = "no equivalent in lohatrain"
OTHER_FAMILY = "for a model lohatrain does not train"
NEEDS_DATASET = "need the dataset folder to become steps"
REFUSED = "values lohatrain refuses"
GROUPS = (NO_EQUIVALENT, REFUSED, NEEDS_DATASET, OTHER_FAMILY, OWN_WAY)

_OWN_WAY = {
    "pretrained_model_name_or_path", "v2", "v_parameterization", "sdxl", "model_list", "vae", "cache_latents",
    "cache_latents_to_disk", "cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "xformers", "sdpa",
    "mem_eff_attn", "no_half_vae", "lowram", "highvram", "lowvram", "vae_batch_size", "max_data_loader_n_workers",
    "persistent_data_loader_workers", "skip_cache_check", "cache_info", "num_cpu_threads_per_process",
    "num_processes", "num_machines", "multi_gpu", "gpu_ids", "main_process_port", "dynamo_backend", "dynamo_mode",
    "dynamo_use_fullgraph", "dynamo_use_dynamic", "extra_accelerate_launch_args", "torch_compile", "save_model_as",
    "use_safetensors", "bypass_mode", "debug_dataset", "logging_dir", "log_with", "log_prefix", "log_tracker_name",
    "log_tracker_config", "log_config", "wandb_api_key", "wandb_run_name", "use_wandb", "disable_mmap_load_safetensors",
    "ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph", "tokenizer_cache_dir", "output_config",
    "save_every_n_epochs_state", "save_last_n_steps_state", "save_last_n_epochs_state", "async_upload",
}
_MODEL_CHOICE = {"sdxl", "v2", "v_parameterization", "pretrained_model_name_or_path", "model_list", "vae"}
# The kohya_ss GUI's switches for other model families, and the fields it passes only with one of them on.
_FAMILY_SWITCHES = {"flux1_checkbox": "FLUX.1", "sd3_checkbox": "SD3", "hunyuan_image_checkbox": "HunyuanImage",
                    "anima_checkbox": "Anima", "lumina_checkbox": "Lumina"}
_FAMILY_FIELDS = re.compile(
    r"(flux1_|sd3_|hunyuan_|anima_|lumina_|t5xxl|clip_l|clip_g|img_|txt_|single_|double_|train_t5xxl|"
    r"train_double|train_single|logit_|mode_scale|pos_emb|weighting_scheme|guidance_scale|discrete_flow_shift|"
    r"model_prediction_type|timestep_sampling|split_mode|split_qkv|train_blocks|enable_all_linear|mem_eff_save|"
    r"apply_t5_attn_mask|cpu_offload_checkpointing|blocks_to_swap|show_timesteps|in_dims|save_clip|ae$|model_type$|"
    r"fp8_base_unet|ggpo|train_lora_ggpo|text_encoder_batch_size|enable_scaled_pos_embed)")
# Fields of the GUI's own (where its file was saved, a repeat of the model's path), and fields the GUI never passes.
_GUI_ONLY = {"save_as_bool", "file_path", "stop_text_encoder_training", "stop_text_encoder_training_pct"}
# Fields the GUI turns into other arguments (read one by one in `_from_gui`).
_GUI_READ_BELOW = {"LoRA_type", "optimizer", "max_resolution", "lr_warmup", "lr_warmup_steps", "epoch",
                   "text_encoder_lr", "unet_lr", "learning_rate", "t5xxl_lr", "additional_parameters",
                   "noise_offset_type", "sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs", "max_train_steps",
                   "max_train_epochs", "lora_network_weights"}

# sd-scripts' defaults that are not None/False/0/"" (an unmapped option at its default changes nothing).
_DEFAULTS = {
    "max_grad_norm": 1.0, "lr_scheduler": "constant", "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1.0,
    "train_batch_size": 1, "max_train_steps": 1600, "max_data_loader_n_workers": 8, "gradient_accumulation_steps": 1,
    "mixed_precision": "no", "dynamo_backend": "no", "multires_noise_discount": 0.3, "loss_type": "l2",
    "huber_schedule": "snr", "huber_c": 0.1, "huber_scale": 1.0, "sample_sampler": "ddim", "prior_loss_weight": 1.0,
    "caption_separator": ",", "caption_extension": ".caption", "vae_batch_size": 1, "min_bucket_reso": 256,
    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "token_warmup_min": 1, "dataset_repeats": 1,
    "save_model_as": "safetensors", "network_alpha": 1.0, "max_token_length": 75, "network_multiplier": 1.0,
    "num_repeats": 1, "noise_offset_type": "Original", "LyCORIS_preset": "full", "num_cpu_threads_per_process": 2,
    "num_processes": 1, "num_machines": 1, "dynamo_mode": "default", "factor": -1, "unit": 1, "train_on_input": True,
    "wd_on_output": True, "block_size": 4, "preset": "full", "algo": "lora", "disable_conv_cp": True,
}
# Other values that change nothing: sd-scripts' own default where the table has the GUI's, and the kohya_ss GUI's
# defaults for what only trades speed or memory (its configs carry every field).
_ALSO_DEFAULT = {"dynamo_backend": ("inductor",), "max_data_loader_n_workers": (0,), "vae_batch_size": (0,),
                 "cache_latents": (True,), "xformers": ("xformers", True)}
# What an sd-scripts TOML leaves out is sd-scripts' default; these change what a run learns where lohatrain's differ.
_SD_SCRIPTS_DEFAULTS = {"network_alpha": 1.0, "train_batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256,
                        "max_bucket_reso": 1024, "caption_extension": ".caption", "learning_rate": 2e-6}

# kohya's network modules and LyCORIS' algorithms that lohatrain trains.
_KOHYA_MODULES = {"networks.lora": "lora", "networks.loha": "loha", "networks.lokr": "lokr"}
_LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
# The kohya_ss GUI's LoRA_type → (network_module, LyCORIS algo, the GUI fields it passes as network_args).
_LYCORIS_FIELDS = ("LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                   "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm")
_KOHYA_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
                 "block_alphas", "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
_GUI_TYPES = {
    "Standard": ("networks.lora", None, _KOHYA_FIELDS),
    "Kohya LoCon": ("networks.lora", None, ("conv_dim", "conv_alpha") + _KOHYA_FIELDS),
    "LoCon": ("lycoris.kohya", "locon", _LYCORIS_FIELDS),
    "LyCORIS/LoCon": ("lycoris.kohya", "locon", _LYCORIS_FIELDS),
    "LyCORIS/LoHa": ("lycoris.kohya", "loha", _LYCORIS_FIELDS),
    "LyCORIS/LoKr": ("lycoris.kohya", "lokr", _LYCORIS_FIELDS + ("factor", "use_cp", "decompose_both")),
    "Kohya LoHa": ("networks.loha", None, ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout")),
    "Kohya LoKr": ("networks.lokr", None,
                   ("conv_dim", "conv_alpha", "use_tucker", "factor", "rank_dropout", "module_dropout")),
}
_GUI_ARG_NAMES = {"LyCORIS_preset": "preset", "unit": "block_size", "constrain": "constraint"}
_GUI_FIELD_NAMES = {arg: gui for gui, arg in _GUI_ARG_NAMES.items()}
_LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
_NETWORK_FIELDS = {"LyCORIS_preset", "conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd",
                   "module_dropout", "use_scalar", "rank_dropout_scale", "train_norm", "factor", "use_cp",
                   "decompose_both", "constrain", "rescaled", "train_on_input", "unit", *_LORAPLUS, "down_lr_weight",
                   "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas",
                   "conv_block_dims", "conv_block_alphas"}

_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "lion": "lion",
               "adafactor": "adafactor"}
# kohya's optimizers that are one of lohatrain's with a difference that does not change the maths much, and why.
_CLOSE_OPTIMIZERS = {
    "pagedadamw8bit": ("adamw8bit", "the same 8-bit AdamW; paging its state to the CPU is bitsandbytes' memory choice"),
    "pagedadamw": ("adamw", "AdamW; paging its state to the CPU is bitsandbytes' memory choice"),
    "pagedadamw32bit": ("adamw", "AdamW; paging its state to the CPU is bitsandbytes' memory choice"),
    "lion8bit": ("lion", "Lion with full-size state instead of 8-bit"),
    "pagedlion8bit": ("lion", "Lion with full-size state instead of 8-bit"),
}
_DADAPT = ("dadaptation", "dadaptadam", "dadaptadagrad", "dadaptadan", "dadaptadanip", "dadaptlion", "dadaptsgd",
           "dadaptadampreprint")
# kohya's sample samplers (diffusers' schedulers) as the WebUI names its samplers.
_SAMPLERS = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "k_lms": "LMS", "euler": "Euler", "k_euler": "Euler",
             "euler_a": "Euler a", "k_euler_a": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "k_dpm_2": "DPM2",
             "dpm_2_a": "DPM2 a", "k_dpm_2_a": "DPM2 a", "dpmsolver++": "DPM++ 2M", "dpmsolver": "DPM++ 2M"}
_DTYPES = {"no": "fp32", "float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# One-to-one options: sd-scripts' name → (lohatrain's, the value's type).
_SAME = {
    "output_name": ("name", str), "output_dir": ("output_dir", str), "shuffle_caption": ("shuffle_tags", bool),
    "keep_tokens": ("keep_tokens", int), "flip_aug": ("flip_aug", bool), "color_aug": ("color_aug", bool),
    "gradient_checkpointing": ("gradient_checkpointing", bool), "seed": ("seed", int), "clip_skip": ("clip_skip", int),
    "noise_offset": ("noise_offset", float), "min_snr_gamma": ("min_snr_gamma", float),
    "zero_terminal_snr": ("zero_terminal_snr", bool), "ip_noise_gamma": ("ip_noise_gamma", float),
    "debiased_estimation_loss": ("debiased_estimation_loss", bool), "loss_type": ("loss_type", str),
    "huber_schedule": ("huber_schedule", str), "huber_c": ("huber_c", float), "huber_scale": ("huber_scale", float),
    "min_timestep": ("min_timestep", int), "max_timestep": ("max_timestep", int),
    "multires_noise_iterations": ("multires_noise_iterations", int), "masked_loss": ("masked_loss", bool),
    "save_every_n_steps": ("save_every_steps", int), "sample_every_n_steps": ("preview_every_steps", int),
    "train_batch_size": ("batch_size", int), "enable_bucket": ("bucketing", bool),
    "caption_extension": ("caption_ext", str), "train_data_dir": ("dataset_dir", str),
    "reg_data_dir": ("reg_data_dir", str),
    "prior_loss_weight": ("prior_loss_weight", float), "caption_dropout_rate": ("caption_dropout_rate", float),
    "caption_tag_dropout_rate": ("caption_tag_dropout_rate", float),
    "keep_tokens_separator": ("keep_tokens_separator", str),
}
# Options a dataset config may set per subset or dataset (kohya library/config_util.py), with their defaults there.
_SUBSET_OPTIONS = {"shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": "", "flip_aug": False,
                   "color_aug": False, "caption_extension": ".caption", "caption_dropout_rate": 0.0,
                   "caption_tag_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "random_crop": False,
                   "caption_separator": ",", "secondary_separator": None, "enable_wildcard": False,
                   "face_crop_aug_range": None, "caption_prefix": None, "caption_suffix": None,
                   "token_warmup_min": 1, "token_warmup_step": 0, "custom_attributes": None, "alpha_mask": False,
                   "resize_interpolation": None, "cache_info": False}
_DATASET_OPTIONS = {"resolution": None, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256,
                    "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False,
                    "network_multiplier": 1.0, "prior_loss_weight": 1.0, "validation_seed": None,
                    "validation_split": 0.0, "debug_dataset": False}
_DATASET_AS_ARGS = {"batch_size": "train_batch_size"}  # the dataset config's names that differ from sd-scripts'


# The option a setting set outside `take` comes from, to name it when lohatrain refuses its value.
_ORIGINS = {"dim": "network_dim", "alpha": "network_alpha", "lokr_factor": "factor", "network_targets": "preset",
            "dora": "dora_wd", "steps": "max_train_steps"}


class _Refused(ValueError):
    """A value that cannot be converted to its lohatrain setting (the message says why)."""


@dataclass(frozen=True)
class NotTaken:
    """An option of the file that no setting took: its name as the file spells it, its value and why."""

    group: str  # one of GROUPS
    option: str
    value: object = None  # None: not shown (the option names it all)
    why: str = ""

    def __str__(self) -> str:
        value = "" if self.value is None else f" = {_shown(self.value)}"
        return f"{self.option}{value}" + (f" ({self.why})" if self.why else "")


@dataclass
class KohyaImport:
    """What an import found: the settings (lohatrain's names, only what the config sets) and where every option
    of the file went."""

    kind: str  # "kohya_ss GUI config", "sd-scripts config" or "sd-scripts dataset config"
    settings: dict = field(default_factory=dict)
    taken: list[str] = field(default_factory=list)  # the file's option names taken
    changed: list[str] = field(default_factory=list)  # "option value → setting value (why)"
    not_taken: list[NotTaken] = field(default_factory=list)
    quiet: list[str] = field(default_factory=list)  # at kohya's default, or unused by kohya for this config

    def message(self) -> str:
        """One message: what was taken (a count), what was changed and what was not, grouped."""
        article = "an" if self.kind.startswith("sd-") else "a"
        lines = [f"Imported {article} {self.kind}: {len(self.taken)} options taken, {len(self.not_taken)} not taken"
                 + (f" ({len(self.quiet)} more at kohya's defaults or unused by kohya for it)." if self.quiet else ".")]
        if self.changed:
            lines.append("Taken with a change:")
            lines += [f"- {line}" for line in self.changed]
        if self.not_taken:
            lines.append("Not taken:")
            for group in GROUPS:
                entries = [str(n) for n in self.not_taken if n.group == group]
                if entries:
                    lines.append(f"- {group}: {'; '.join(entries)}")
        return "\n".join(lines)

    def complete(self, family: str = "sd1", base: dict | None = None) -> TrainSettings:
        """The settings a run would get: the family's defaults, then `base` (e.g. the host's device defaults),
        then the config's. A config that names no dataset folder leaves it empty (the user picks one)."""
        data = {**(base or {}), **self.settings}
        folder = data.get("dataset_dir", "")
        settings = TrainSettings.from_dict({**data, "dataset_dir": folder or "-"}, family)
        return dataclasses.replace(settings, dataset_dir=folder)

    def accounts_for(self, option: str) -> bool:
        """Whether the file's option is taken, listed or counted as quiet (every one must be)."""
        names = [*self.taken, *(n.option for n in self.not_taken), *self.quiet]
        return any(name == option or name.startswith(option + " ") for name in names)


def import_file(path: str | Path, dataset_config: str | Path | None = None, family: str = "sd1") -> KohyaImport:
    """A config file (and a dataset config file); the command line's `--kohya-config`. A dataset config the config
    names by path is read too, from where it says or beside the config."""
    path = Path(path).expanduser()
    text = _read(path, "kohya config")
    dataset_text = _read(Path(dataset_config).expanduser(), "kohya dataset config") if dataset_config else None
    return import_text(text, dataset_text, family=family, base_dir=path.parent)


def import_text(text: str, dataset_config: str | None = None, *, family: str = "sd1", base_dir: Path | None = None,
                may_read: Callable[[Path], bool] = lambda path: True) -> KohyaImport:
    """A config's text: JSON is the kohya_ss GUI's, TOML sd-scripts' (a TOML with `[[datasets]]` alone is a dataset
    config). `dataset_config` is the dataset config's text (TOML or JSON). `base_dir`: where files the config names
    by relative path are looked for (None: no file it names is opened); `may_read(folder)`: whether a folder may be
    read (its images counted, to turn epochs into steps)."""
    data, form = _parse(text)
    if isinstance(data.get("datasets"), list):
        args, labels, quiet, dataset_config = {}, {}, [], text
        kind = "sd-scripts dataset config"
    elif form == "gui":
        args, labels, quiet = _from_gui(data)
        kind = "kohya_ss GUI config"
    else:
        given = _flatten(data)
        args = {**_SD_SCRIPTS_DEFAULTS, **given}
        labels = {k: None for k in set(_SD_SCRIPTS_DEFAULTS) - set(given)}  # filled in: never counted or listed
        quiet, kind = [], "sd-scripts config"
    builder = _Builder(KohyaImport(kind, quiet=quiet), args, labels, family, may_read)
    if builder.given("dataset_config"):
        if dataset_config is None:
            dataset_config = builder.named_dataset_config(str(args["dataset_config"]), base_dir)
        else:
            builder.used("dataset_config")  # the dataset config given with it stands for the one it names
    builder.build(_parse_dataset(dataset_config) if dataset_config is not None else None)
    return builder.result


# --- reading ----------------------------------------------------------------------------------------------------

def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SettingsError([f"{what} {path} does not exist"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError([f"{what} {path} cannot be read: {e}"]) from None


def _parse(text: str) -> tuple[dict, str]:
    """The config as a dict, and whether it is the GUI's JSON ("gui") or TOML ("toml")."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError([f"the kohya config is not valid JSON: {e}"]) from None
        if not isinstance(data, dict):
            raise SettingsError(["a kohya_ss GUI config must hold a JSON object"])
        return data, "gui"
    try:
        return toml.loads(text), "toml"
    except (toml.TomlDecodeError, TypeError, ValueError) as e:
        raise SettingsError(["the kohya config is neither the kohya_ss GUI's JSON nor an sd-scripts TOML "
                             f"(it does not parse as TOML: {e})"]) from None


def _parse_dataset(text: str) -> dict:
    data = _parse(text)[0]
    if not isinstance(data.get("datasets", []), list) or not isinstance(data.get("general", {}), dict):
        raise SettingsError(["a kohya dataset config has [general] and [[datasets]] with [[datasets.subsets]]"])
    return data


def _flatten(data: dict) -> dict:
    """sd-scripts reads a config's sections as one level: `[model] network_dim = 8` is `network_dim`."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _from_gui(gui: dict) -> tuple[dict, dict, list[str]]:
    """The sd-scripts arguments the kohya_ss GUI runs for its JSON (lora_gui.py's `train_model`), with the GUI's
    field name of each where it differs, and the GUI's fields it does not pass for this config (quiet)."""
    g = {k: _plain(v) for k, v in gui.items()}
    args, labels, quiet = {}, {}, []
    family = next((name for switch, name in _FAMILY_SWITCHES.items() if g.get(switch)), None)
    lora_type = g.get("LoRA_type")
    module, algo, passed = _GUI_TYPES.get(lora_type, (None, None, ()))
    passed += _LORAPLUS if module else ()
    for key, value in g.items():
        if key in _GUI_ONLY:
            quiet.append(key)
        elif key in _GUI_READ_BELOW:
            continue
        elif key in _FAMILY_SWITCHES or _FAMILY_FIELDS.match(key):
            if value and (key in _FAMILY_SWITCHES or family and not _is_off(value)):
                args[key] = value
            else:
                quiet.append(key)  # the GUI passes another family's fields only with its switch on
        elif key in _NETWORK_FIELDS:
            if key not in passed:
                quiet.append(key)  # the GUI passes it for other network types only
        else:
            args[key] = value
    # the network
    if module:
        args["network_module"] = module
        labels["network_module"] = "LoRA_type"
        net = {}
        if algo:
            net["algo"] = algo
        for key in passed:  # LyCORIS gets every field of its type; kohya's modules and LoRA+ only what is set
            if key in g and (algo and key not in _LORAPLUS or not _is_off(g[key])):
                net[_GUI_ARG_NAMES.get(key, key)] = g[key]
            elif key in g:
                quiet.append(key)
        args["network_args"] = net
    elif "LoRA_type" in g:
        args["LoRA_type"] = lora_type
    # learning rates, as the GUI passes them
    lr, te, unet = (_number_or(g.get(k), 0.0) for k in ("learning_rate", "text_encoder_lr", "unet_lr"))
    for key, value in (("learning_rate", lr), ("unet_lr", unet or None), ("text_encoder_lr", te or None)):
        if key in g:
            args[key] = value
    if te == 0 and unet != 0:
        args["network_train_unet_only"] = True
        labels["network_train_unet_only"] = "text_encoder_lr"
    if te != 0 and unet == 0 and "unet_lr" in g:
        args["network_train_text_encoder_only"] = True
        labels["network_train_text_encoder_only"] = "unet_lr"
    if "t5xxl_lr" in g:
        quiet.append("t5xxl_lr")
    # renamed fields
    for gui_key, arg in (("optimizer", "optimizer_type"), ("max_resolution", "resolution"),
                         ("lora_network_weights", "network_weights")):
        if gui_key in g and (arg not in args or not _is_off(g[gui_key])):
            if arg in args:
                quiet.append(arg)  # an older GUI's name for the same field wins when set
            args[arg], labels[arg] = g[gui_key], gui_key
        elif gui_key in g:
            quiet.append(gui_key)
    if g.get("sdxl"):
        for gui_key, arg in (("sdxl_no_half_vae", "no_half_vae"),
                             ("sdxl_cache_text_encoder_outputs", "cache_text_encoder_outputs")):
            if gui_key in g:
                args[arg], labels[arg] = g[gui_key], gui_key
    else:
        quiet += [k for k in ("sdxl_no_half_vae", "sdxl_cache_text_encoder_outputs") if k in g]
    # noise: the GUI passes the noise offset or the multires noise, by noise_offset_type
    noise_type = g.get("noise_offset_type", "Original")
    original = ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength")
    multires = ("multires_noise_iterations", "multires_noise_discount")
    for key in multires if noise_type == "Original" else original:
        if key in args:
            del args[key]
            quiet.append(key)
    if "noise_offset_type" in g:
        quiet.append("noise_offset_type")
    # the run's length: epochs or steps, the warm-up as a ratio of it (lr_warmup is a percent)
    steps, epochs = _int_or(g.get("max_train_steps"), 0), _int_or(g.get("max_train_epochs"), 0)
    if epochs:
        args["max_train_epochs"] = epochs
    elif steps:
        args["max_train_steps"] = steps
    elif not g.get("dataset_config") and "epoch" in g:
        args["epoch"] = _int_or(g["epoch"], 1)  # the GUI counts the steps of these epochs itself
    warmup_steps, warmup_percent = _number_or(g.get("lr_warmup_steps"), 0), _number_or(g.get("lr_warmup"), 0)
    if warmup_steps > 0:
        args["lr_warmup_steps"] = int(warmup_steps)
    elif warmup_percent:
        args["lr_warmup"] = warmup_percent  # a percent of the steps
    quiet += [k for k in ("max_train_steps", "max_train_epochs", "epoch", "lr_warmup", "lr_warmup_steps")
              if k in g and k not in args]
    # what the GUI adds to the command line as it is
    extra = _command_line(str(g.get("additional_parameters") or ""))
    for key, value in extra.items():
        if key in args and key not in labels:
            quiet.append(key)  # the command line's value wins
        args[key], labels[key] = value, f"additional_parameters --{key}"
    if "additional_parameters" in g and not extra:
        quiet.append("additional_parameters")
    return args, labels, quiet


def _command_line(text: str) -> dict:
    """`--name value`, `--name=value`, `--flag` and `--name v1 v2` as the GUI appends them to sd-scripts' command."""
    try:
        tokens = shlex.split(text)
    except ValueError:
        tokens = text.split()
    found, name = {}, None
    for token in tokens:
        if token.startswith("--"):
            name, _, value = token[2:].partition("=")
            found[name] = value if value else True
        elif name is not None:
            previous = found[name]
            found[name] = token if previous is True else ([*previous, token] if isinstance(previous, list)
                                                          else [previous, token])
    return {k: _plain(v) for k, v in found.items()}


# --- values -------------------------------------------------------------------------------------------------------

def _plain(value):
    """A GUI value as sd-scripts receives it: numbers in strings as numbers ("0.0001", "1"), "true"/"false" as such."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        try:
            number = float(text)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    return value


def _is_off(value) -> bool:
    return value is None or value is False or value == "" or value == [] or value == {} or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _is_default(name: str, value) -> bool:
    """At sd-scripts' (or the GUI's) default: an unmapped option that changes nothing."""
    key = name.rsplit(" ", 1)[-1].lstrip("-")
    value = _plain(value)
    if any(value == other and type(value) is type(other) for other in _ALSO_DEFAULT.get(key, ())):
        return True
    if key in _DEFAULTS:
        return value == _DEFAULTS[key] or value is None or value == ""
    return _is_off(value)


def _number_or(value, default):
    value = _plain(value)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _int_or(value, default):
    value = _number_or(value, None)
    return int(value) if value is not None else default


def _convert(value, kind):
    """A kohya value as a lohatrain setting's type; _Refused when it is not one."""
    value = _plain(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise _Refused("must be true or false")
    if kind is int:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise _Refused("must be a whole number")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Refused("must be a number")
    return str(value)


def _shown(value) -> str:
    """A value as the file wrote it (TOML's dates as text)."""
    return json.dumps(value, default=str) if isinstance(value, (str, bool, list, dict)) or value is None else str(value)


# --- mapping ------------------------------------------------------------------------------------------------------

class _Builder:
    """Maps sd-scripts' arguments (and a dataset config) to settings, recording where every option went."""

    def __init__(self, result: KohyaImport, args: dict, labels: dict, family: str, may_read):
        self.result, self.args, self.labels, self.family, self.may_read = result, args, labels, family, may_read
        self.settings = result.settings
        self.sources: dict[str, list[str]] = {}  # setting → the option names it came from
        self.general: dict = {}  # a dataset config's [general]
        self.done: set[str] = set()  # the arguments dealt with

    # recording
    def label(self, name: str) -> str | None:
        """The option's name as the file spells it (None: filled in as sd-scripts' default, not the file's)."""
        return self.labels.get(name, name)

    def used(self, *names: str) -> None:
        """Dealt with, taking nothing: unused by kohya for this config, or its value changes nothing."""
        for name in names:
            if name in self.args and name not in self.done:
                self.done.add(name)
                if self.label(name) is not None and self.label(name) not in self.result.taken:
                    self.result.quiet.append(self.label(name))

    def take(self, setting: str, value, *names: str) -> None:
        """`setting` = value, from these options."""
        if setting not in FIELDS:  # a setting this lohatrain does not have yet
            for name in names:
                if _is_default(name, self.args.get(name)):
                    self.used(name)
                else:
                    self.skip(name, why="needs a newer lohatrain")
            return
        self.settings[setting] = value
        for name in names:
            if name in self.done or name not in self.args:
                continue
            self.done.add(name)
            label = self.label(name)
            if label is not None:
                self.sources.setdefault(setting, []).append(label)
                if label not in self.result.taken:
                    self.result.taken.append(label)

    def change(self, text: str) -> None:
        self.result.changed.append(text)

    def skip(self, name: str, group: str = NO_EQUIVALENT, why: str = "", value=None, shown: str | None = None) -> None:
        """Not taken: listed under `group`, with its value and why."""
        self.done.add(name)
        label = shown or self.label(name)
        if label is None:
            return
        self.not_taken(group, label, self.args.get(name) if value is None else value, why)

    def not_taken(self, group: str, option: str, value=None, why: str = "") -> None:
        self.result.not_taken.append(NotTaken(group, option, value, why))

    def given(self, name: str) -> bool:
        return name in self.args and name not in self.done and not _is_off(self.args[name])

    def named_dataset_config(self, path: str, base_dir: Path | None) -> str | None:
        """The text of the dataset config the config names by path: where it says, or beside the config."""
        if base_dir is None:
            self.skip("dataset_config", why="its file is not read here: send its text as dataset_config")
            return None
        candidates = [Path(path).expanduser()]
        if not candidates[0].is_absolute():
            candidates.append(base_dir / candidates[0])
            candidates.append(base_dir / Path(path).name)
        for candidate in candidates:
            if candidate.is_file():
                self.done.add("dataset_config")
                self.result.taken.append(self.label("dataset_config"))
                return _read(candidate, "kohya dataset config")
        self.skip("dataset_config", why="not found: give the file with --kohya-dataset-config")
        return None

    # the whole mapping
    def build(self, dataset: dict | None) -> None:
        if dataset is not None:
            self.dataset_config(dataset)
        self.network()
        self.learning_rates()
        self.optimizer()
        self.resolution_and_buckets()
        self.one_to_one()
        self.precision_and_saving()
        self.steps()
        self.schedule()
        self.previews()
        self.rest()
        self.drop_refused()

    def network(self) -> None:
        a = self.args
        module = str(a.get("network_module") or "")
        net = _network_args(a.get("network_args"))
        self.done.add("network_args")  # a list of options, each taken or listed by its own name
        gui = self.result.kind.startswith("kohya_ss")

        def label(key: str) -> str:
            return _GUI_FIELD_NAMES.get(key, key) if gui else f"network_args {key}"

        def pop(key: str, default=None):
            """A network argument, taken (counted by its own name) when given."""
            if key in net:
                self.result.taken.append(label(key))
            return net.pop(key, default)

        if "LoRA_type" in a or not module:  # a GUI type lohatrain does not train, or no network named
            if "LoRA_type" in a:
                self.skip("LoRA_type", why="lohatrain trains LoRA, LoCon, LoHa and LoKr")
            elif gui:
                self.not_taken(NO_EQUIVALENT, "LoRA_type", why="missing: not a config of kohya_ss' LoRA tab (its "
                                                               "Dreambooth and Finetune tabs train the whole model)")
            for name in ("network_dim", "network_alpha"):
                if name in a:
                    self.skip(name, why="the network's size, with LoRA_type" if gui else "no network_module")
            for key, value in net.items():
                self.skip("network_args", value=value, shown=label(key), why="no network_module")
            return
        algo = str(net.pop("algo", "lora")).lower() if module == "lycoris.kohya" else None
        method = _KOHYA_MODULES.get(module) if algo is None else _LYCORIS_ALGOS.get(algo)
        if method is None:
            what = f"{module} with algo {algo}" if algo else module
            self.skip("network_module", why=f"{what}: lohatrain trains LoRA, LoCon, LoHa and LoKr", value=module)
            for name in ("network_dim", "network_alpha"):
                if name in a:
                    self.skip(name, why=f"the size of a {what} network")
            for key, value in net.items():
                self.skip("network_args", value=value, shown=label(key), why=f"for {what}")
            return
        if algo is not None and gui is False:
            self.result.taken.append(label("algo"))
        lycoris = algo is not None
        dim = _int_or(a.get("network_dim"), 4)  # kohya's and LyCORIS' default rank
        alpha = float(_number_or(a.get("network_alpha"), 1.0))
        # LyCORIS trains the convolutions at the linear rank and alpha unless told otherwise; kohya's modules not
        conv_dim = _int_or(pop("conv_dim"), dim if lycoris else 0)
        conv_alpha = float(_number_or(pop("conv_alpha"), alpha if lycoris else 1.0))
        if method == "lora" and conv_dim > 0:
            method = "locon"
        self.take("training_method", method, *[n for n in ("network_module", "network_dim", "network_alpha")
                                                if n in a])
        self.settings.update(dim=dim, alpha=alpha)
        if method == "lokr":
            self.settings["lokr_factor"] = _int_or(pop("factor", -1), -1)
            if 0 < conv_dim < 10000:
                self.change(f"conv_dim {conv_dim} → conv_dim 1 (lohatrain's LoKr keeps each convolution's w2 whole: "
                            "conv_dim only switches the convolutions on)")
            conv_dim, conv_alpha = (1, 1.0) if conv_dim > 0 else (0, 1.0)
        self.settings.update(conv_dim=conv_dim, conv_alpha=conv_alpha)
        preset = str(net.get("preset", "full" if lycoris else "")).lower()  # LyCORIS' default preset is full
        if preset in TARGETS:
            self.settings["network_targets"] = preset
            pop("preset")
        elif preset:
            self.skip("network_args", value=net.pop("preset"), shown=label("preset"),
                      why=f"lohatrain's targets are {', '.join(TARGETS)}")
        if lycoris and net.get("dora_wd") is True:
            self.settings["dora"] = pop("dora_wd")
            if net.pop("wd_on_output", True) is not False:
                self.change("dora_wd → dora with its scale per input channel (the WebUI's axis), where LyCORIS' "
                            "default is per output channel")
        if module == "networks.lora":  # kohya's block learning-rate weights are networks.lora's
            for key in ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"):
                if key in net and not _is_off(net[key]):
                    value = net[key]
                    try:
                        self.settings[key] = _convert(value, float) if key.endswith("threshold") else str(value)
                    except _Refused:
                        continue
                    pop(key)
        for key, value in net.items():
            if _is_default(key, value):
                self.result.quiet.append(label(key))
            else:
                self.skip("network_args", OWN_WAY if key == "bypass_mode" else NO_EQUIVALENT, value=value,
                          shown=label(key), why="kohya's networks.lora only" if key.endswith("_lr_weight") else "")

    def learning_rates(self) -> None:
        a = self.args
        lr = _number_or(a.get("learning_rate"), 2e-6)
        unet = _number_or(a.get("unet_lr"), None)
        te_given = a.get("text_encoder_lr")
        te_values = [x for x in (te_given if isinstance(te_given, list) else [te_given]) if _plain(x) is not None]
        te = _number_or(te_values[0], lr) if te_values else lr
        if len({_number_or(x, None) for x in te_values}) > 1:
            self.change(f"text_encoder_lr {te_given} → {te} (lohatrain trains both SDXL text encoders at one rate)")
        if a.get("network_train_text_encoder_only"):
            self.skip("network_train_text_encoder_only", why="lohatrain always trains the UNet")
        if a.get("network_train_unet_only"):
            te = 0.0
        self.take("learning_rate", float(unet if unet is not None else lr), "unet_lr" if unet is not None
                  else "learning_rate")
        self.take("text_encoder_lr", float(te), "text_encoder_lr" if te_values else "learning_rate",
                  *[n for n in ("network_train_unet_only",) if n in a])
        self.used("learning_rate", "unet_lr", "text_encoder_lr")

    def optimizer(self) -> None:
        a = self.args
        given = str(a.get("optimizer_type") or "").strip()
        name = given.lower().rsplit(".", 1)[-1] if given else (
            "adamw8bit" if a.get("use_8bit_adam") else "lion" if a.get("use_lion_optimizer") else "adamw")
        names = [n for n in ("optimizer_type", "use_8bit_adam", "use_lion_optimizer") if n in a]
        args_text = a.get("optimizer_args") or []
        tokens = args_text if isinstance(args_text, list) else str(args_text).split()
        tokens = [str(t).strip().strip('"') for t in tokens if str(t).strip().strip('"')]
        if name in _OPTIMIZERS:
            chosen = _OPTIMIZERS[name]
        elif name in _CLOSE_OPTIMIZERS:
            chosen, why = _CLOSE_OPTIMIZERS[name]
            self.change(f"optimizer {given} → {chosen} ({why})")
        elif name in _DADAPT:
            chosen = "prodigy"
            self.change(f"optimizer {given} → prodigy (D-Adaptation's successor by its authors, also learning-rate "
                        "free: the learning rates of about 1.0 keep their meaning)")
        else:
            for n in names:
                self.skip(n, why=f"lohatrain's optimizers are {', '.join(optimizers.OPTIMIZERS)}")
            if tokens:
                self.skip("optimizer_args", why=f"arguments of {given}")
            return
        self.take("optimizer", chosen, *names)
        self.optimizer_args(chosen, tokens)

    def optimizer_args(self, chosen: str, tokens: list[str]) -> None:
        """kohya's optimizer_args: the ones lohatrain has a setting for become it, the rest optimizer_args (those
        the optimizer's constructor does not take, when its package is here to ask, are listed instead)."""
        if not tokens:
            self.used("optimizer_args")
            return
        parsed, problems = optimizers.parse_args(" ".join(tokens))
        if problems:
            self.skip("optimizer_args", REFUSED, why="; ".join(problems))
            return
        own = {"weight_decay": ("weight_decay", float)}
        if chosen == "prodigy":
            own.update(d_coef=("prodigy_d_coef", float), use_bias_correction=("prodigy_bias_correction", bool),
                       safeguard_warmup=("prodigy_safeguard_warmup", bool))
        rest = {}
        for key, value in parsed.items():
            if key in own:
                try:
                    self.take(own[key][0], _convert(value, own[key][1]))
                    continue
                except _Refused:
                    pass
            rest[key] = value
        if chosen == "adafactor" and rest.get("relative_step") is False:
            self.take("adafactor_relative_step", False)
            del rest["relative_step"]
            for key in ("scale_parameter", "warmup_init"):  # what a fixed rate sets too
                if rest.get(key) is False:
                    del rest[key]
        elif chosen == "adafactor" and rest.get("relative_step") is True:
            del rest["relative_step"]
        takes = _constructor_arguments(chosen)
        kept = []
        for key, value in rest.items():
            if takes is not None and key not in takes:
                self.skip("optimizer_args", why=f"{chosen} has no argument {key}", value=value,
                          shown=f"{self.label('optimizer_args')} {key}")
            else:
                kept.append(next(t for t in tokens if t.split("=", 1)[0].strip() == key))
        self.take("optimizer_args", " ".join(kept), "optimizer_args")
        if not kept:
            del self.settings["optimizer_args"]

    def resolution_and_buckets(self) -> None:
        a = self.args
        if "resolution" in a and not _is_off(a["resolution"]):
            value = a["resolution"]
            parts = value if isinstance(value, (list, tuple)) else [p for p in str(value).split(",") if p.strip()]
            try:
                sides = [int(float(p)) for p in parts]
                width, height = (sides * 2)[:2]
            except (TypeError, ValueError):
                self.skip("resolution", REFUSED, why="not a size")
            else:
                side = _multiple_of_64(math.sqrt(width * height))
                self.take("resolution", side, "resolution")
                if (width, height) != (side, side):
                    self.change(f"{self.label('resolution')} {width},{height} → resolution {side} (lohatrain's "
                                "resolution is a square's side, the buckets around its area; multiples of 64)")
        else:
            self.used("resolution")
        bucketing = self.args.get("enable_bucket")
        if bucketing is True:
            for name, setting, rounding in (("min_bucket_reso", "bucket_min_side", math.ceil),
                                            ("max_bucket_reso", "bucket_max_side", math.floor)):
                if name in a:
                    value = _int_or(a[name], None)
                    if value is None:
                        self.skip(name, REFUSED, why="not a number")
                        continue
                    side = max(64, int(rounding(value / 64)) * 64)
                    self.take(setting, side, name)
                    if side != value:
                        self.change(f"{self.label(name)} {value} → {setting} {side} (lohatrain's bucket sides are "
                                    "multiples of 64)")
            if self.given("bucket_no_upscale") and a["bucket_no_upscale"] is True:
                self.skip("bucket_no_upscale", why="lohatrain fits every image to its bucket, upscaling a small one "
                                                   "with a warning")
            if "bucket_reso_steps" in a and not _is_default("bucket_reso_steps", a["bucket_reso_steps"]):
                self.skip("bucket_reso_steps", why="lohatrain's buckets step by 64 pixels")
        else:
            self.used("min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "bucket_reso_steps")

    def one_to_one(self) -> None:
        a = self.args
        if not (_int_or(a.get("multires_noise_iterations"), 0) > 0):
            self.used("multires_noise_discount")
        elif "multires_noise_discount" in a:
            self.take_converted("multires_noise_discount", "multires_noise_discount", float)
        if "loss_type" in a and str(a["loss_type"]).lower() == "l2":
            self.used("huber_schedule", "huber_c", "huber_scale")
        for name, (setting, kind) in _SAME.items():
            if name not in a or name in self.done:
                continue
            if kind is str and not a[name]:
                self.used(name)  # the GUI's empty field: not set
                continue
            if name in ("seed", "clip_skip", "noise_offset", "min_snr_gamma", "ip_noise_gamma", "min_timestep",
                        "max_timestep", "save_every_n_steps", "sample_every_n_steps") and _is_off(a[name]):
                self.used(name)  # sd-scripts' None (the GUI's 0 or ""): off, lohatrain's default
                continue
            value = str(a[name]).lower() if name in ("loss_type", "huber_schedule") else a[name]
            self.take_converted(name, setting, kind, value)
        if self.given("save_state") or self.given("save_state_on_train_end"):
            self.take("keep_state", True, *[n for n in ("save_state", "save_state_on_train_end") if self.given(n)])
        self.used("save_state", "save_state_on_train_end")

    def take_converted(self, name: str, setting: str, kind, value=None) -> None:
        value = self.args[name] if value is None else value
        try:
            self.take(setting, _convert(value, kind), name)
        except _Refused as e:
            self.skip(name, REFUSED, why=f"{setting} {e}")

    def precision_and_saving(self) -> None:
        for name, setting in (("mixed_precision", "train_dtype"), ("save_precision", "save_dtype")):
            if name in self.args and not _is_off(self.args[name]):
                dtype = _DTYPES.get(str(self.args[name]).lower())
                if dtype:
                    self.take(setting, dtype, name)
                else:
                    self.skip(name, why=f"lohatrain's precisions are {', '.join(sorted(set(_DTYPES.values())))}")
            else:
                self.used(name)

    def steps_per_epoch(self) -> tuple[int | None, str]:
        """Steps per epoch from the dataset folder (or the dataset config's subsets), or (None, why not)."""
        draws = getattr(self, "dataset_draws", None)
        if draws is None:
            folder = self.settings.get("dataset_dir") or self.args.get("train_data_dir")
            if not folder:
                return None, "no dataset folder is named"
            draws, why = _count_draws(Path(str(folder)).expanduser(), self.may_read)
            if draws is None:
                return None, why
            reg = self.settings.get("reg_data_dir") or self.args.get("reg_data_dir")
            if reg and _count_draws(Path(str(reg)).expanduser(), self.may_read)[0]:
                draws *= 2  # kohya draws as many regularization images as training images
        batch = self.settings.get("batch_size") or TrainSettings.defaults_for(self.family).batch_size
        return math.ceil(draws / batch), ""

    def steps(self) -> None:
        a = self.args
        epochs_name = "max_train_epochs" if _int_or(a.get("max_train_epochs"), 0) > 0 else "epoch"
        epochs = _int_or(a.get(epochs_name), 0)
        steps = _int_or(a.get("max_train_steps"), 0)
        if epochs > 0:
            per_epoch, why = self.steps_per_epoch()
            if per_epoch:
                self.take("steps", epochs * per_epoch, epochs_name)
                self.change(f"{epochs_name} {epochs} → steps {epochs * per_epoch} ({per_epoch} steps an epoch: the "
                            "dataset's images × repeats ÷ batch size)")
                if steps:
                    self.used("max_train_steps")  # sd-scripts: epochs override steps
            else:
                self.skip(epochs_name, NEEDS_DATASET, why=why)
                if steps:
                    self.skip("max_train_steps", NEEDS_DATASET, why="kohya trains the epochs instead")
        elif steps > 0:
            self.take("steps", steps, "max_train_steps")
        elif "network_module" in a and not self.result.kind.startswith("sd-scripts dataset"):
            self.settings["steps"] = 1600
            self.change("no max_train_steps or epochs → steps 1600 (sd-scripts' default)")
        self.used("max_train_epochs", "max_train_steps", "epoch")
        for name, setting in (("save_every_n_epochs", "save_every_steps"),
                              ("sample_every_n_epochs", "preview_every_steps")):
            if not self.given(name):
                self.used(name)
            elif setting in self.settings:
                self.skip(name, why=f"lohatrain has one interval: {setting} comes from the steps option")
            else:
                per_epoch, why = self.steps_per_epoch()
                every = _int_or(a[name], 0)
                if per_epoch:
                    self.take(setting, every * per_epoch, name)
                    self.change(f"{self.label(name)} {every} → {setting} {every * per_epoch}")
                else:
                    self.skip(name, NEEDS_DATASET, why=why)

    def schedule(self) -> None:
        """kohya's schedules as lohatrain's three (diffusers' cosine and linear, after a linear warm-up)."""
        a = self.args
        name = str(a.get("lr_scheduler") or "constant").lower()
        cycles = _int_or(a.get("lr_scheduler_num_cycles"), 1)
        power = _number_or(a.get("lr_scheduler_power"), 1.0)
        if self.settings.get("optimizer") == "adafactor" and self.settings.get("adafactor_relative_step", True):
            self.take("lr_scheduler", "constant", *[n for n in ("lr_scheduler",) if n in a])
            self.settings["lr_warmup_steps"] = 0
            if name not in ("constant", "adafactor") or self.given("lr_warmup_steps") or self.given("lr_warmup"):
                self.change(f"lr_scheduler {name} → constant, no warm-up (Adafactor with relative_step sets its own "
                            "step size: kohya switches to its adafactor schedule)")
            self.used("lr_warmup_steps", "lr_warmup", "lr_scheduler_num_cycles", "lr_scheduler_power")
            return
        simple = {"constant": "constant", "constant_with_warmup": "constant", "cosine": "cosine", "linear": "linear",
                  "adafactor": "constant"}
        if name == "cosine_with_restarts":
            if cycles != 1:
                self.change(f"lr_scheduler cosine_with_restarts with {cycles} cycles → cosine (one cycle)")
            self.take("lr_scheduler", "cosine", "lr_scheduler", "lr_scheduler_num_cycles")
        elif name == "polynomial" and power == 1:  # diffusers' polynomial of power 1 is the linear decay
            self.take("lr_scheduler", "linear", "lr_scheduler", "lr_scheduler_power")
        elif name in simple:
            if "lr_scheduler" in a:
                self.take("lr_scheduler", simple[name], "lr_scheduler")
        else:
            self.skip("lr_scheduler", why="lohatrain's schedules are constant, cosine and linear (after a warm-up)")
        if name in simple or name == "cosine_with_restarts":
            self.used("lr_scheduler_num_cycles", "lr_scheduler_power")  # what kohya's schedule does not read
        if self.given("lr_scheduler_type"):
            self.skip("lr_scheduler_type", why="a scheduler class of kohya's own; lohatrain's are constant, cosine, "
                                               "linear")
        self.warmup()

    def warmup(self) -> None:
        """kohya's warm-up: steps, a ratio of the steps (sd-scripts' float below 1) or the GUI's percent."""
        name = "lr_warmup" if self.given("lr_warmup") else "lr_warmup_steps"
        if not self.given(name):
            self.used("lr_warmup_steps", "lr_warmup")
            return
        warmup = _number_or(self.args[name], None)
        if warmup is None:
            self.skip(name, REFUSED, why="not a number")
            return
        ratio = warmup / 100 if name == "lr_warmup" else warmup if isinstance(warmup, float) and warmup < 1 else None
        if ratio is None:
            self.take("lr_warmup_steps", int(warmup), name)
        elif self.settings.get("steps"):
            steps = self.settings["steps"]
            self.take("lr_warmup_steps", int(ratio * steps), name)
            self.change(f"{name} {warmup:g}{'%' if name == 'lr_warmup' else ''} → lr_warmup_steps "
                        f"{int(ratio * steps)} of {steps} steps")
        else:
            self.skip(name, NEEDS_DATASET, why="a share of the steps, which are not known")

    def previews(self) -> None:
        a = self.args
        if "sample_prompts" in a and not _is_off(a["sample_prompts"]):
            prompts = [line.split(" --", 1)[0].strip() for line in str(a["sample_prompts"]).splitlines()]
            prompts = [p for p in prompts if p and not p.startswith("#")]
            if len(prompts) == 1 and Path(prompts[0]).suffix.lower() in (".txt", ".toml", ".json"):
                self.skip("sample_prompts", why="a prompt file: type its prompts in preview_prompts")
            else:
                self.take("preview_prompts", prompts, "sample_prompts")
                if any(" --" in line for line in str(a["sample_prompts"]).splitlines()):
                    self.change("sample_prompts → preview_prompts without kohya's --w/--h/--s/--d… options "
                                "(previews use the preview settings)")
        else:
            self.used("sample_prompts")
        sampling = self.settings.get("preview_every_steps")
        sampler = str(a.get("sample_sampler") or "").lower()
        if sampling and sampler in _SAMPLERS:
            self.take("preview_sampler", _SAMPLERS[sampler], "sample_sampler")
        elif sampling and sampler:
            self.skip("sample_sampler", why="not one of the WebUI's samplers")
        else:
            self.used("sample_sampler", "sample_at_first")

    def dataset_config(self, data: dict) -> None:
        """A dataset config: its run-wide options (when every subset agrees), its folders and the epoch's draws."""
        general = self.general = data.get("general") or {}
        datasets = [d for d in data.get("datasets") or [] if isinstance(d, dict)]
        subsets = [(i, j, s, d) for i, d in enumerate(datasets) for j, s in enumerate(d.get("subsets") or [])
                   if isinstance(s, dict)]
        where = lambda i, j: f"datasets[{i}].subsets[{j}]"  # noqa: E731
        if not subsets:
            self.not_taken(NO_EQUIVALENT, "datasets", why="the dataset config has no subsets")
            return
        taken_here = []
        for option, default in {**_SUBSET_OPTIONS, **_DATASET_OPTIONS}.items():
            arg = _DATASET_AS_ARGS.get(option, option)
            per_dataset = option in _DATASET_OPTIONS
            values, set_here = {}, False
            for i, j, subset, ds_ in subsets:
                chain = [ds_, general] if per_dataset else [subset, ds_, general]
                value = next((c[option] for c in chain if c.get(option) is not None), None)
                set_here = set_here or value is not None
                fallback = self.args.get(arg, default)  # sd-scripts: the config's argument, else the default
                values[f"datasets[{i}]" if per_dataset else where(i, j)] = fallback if value is None else value
            if not set_here:
                continue
            distinct = {json.dumps(v, sort_keys=True, default=str) for v in values.values()}
            if len(distinct) > 1:
                self.not_taken(NO_EQUIVALENT, option, values, "differs by subset: lohatrain sets it for the whole run")
                self.done.add(arg)
                self.args.pop(arg, None)
                continue
            value = next(iter(values.values()))
            self.args[arg] = value
            self.labels[arg] = option
            self.done.discard(arg)
            taken_here.append(arg)
        for where_, table, known in [("general", general, {})] + [(f"datasets[{i}]", d, {"subsets": None})
                                                                 for i, d in enumerate(datasets)]:
            for key in table:
                if key not in {**_SUBSET_OPTIONS, **_DATASET_OPTIONS, **known, "class_tokens": None}:
                    self.not_taken(NO_EQUIVALENT, f"{where_}.{key}", table[key])
        if self.args.get("alpha_mask") is True:
            self.args.setdefault("masked_loss", False)
            if self.args["masked_loss"]:
                self.take("masked_loss", True, "masked_loss", "alpha_mask")
            else:
                self.skip("alpha_mask", why="only with masked_loss")
        self.folders(subsets)

    def folders(self, subsets) -> None:
        """The subsets' folders as lohatrain's dataset_dir (and reg_data_dir), with the epoch's draws."""
        for key in ("train_data_dir", "reg_data_dir"):
            self.used(key)  # sd-scripts reads the folders from the dataset config instead
        train = [s for s in subsets if not s[2].get("is_reg")]
        reg = [s for s in subsets if s[2].get("is_reg")]
        draws = {}
        for group, found, setting in ((train, "training", "dataset_dir"), (reg, "regularization", "reg_data_dir")):
            if not group:
                continue
            layout = self.layout(group, found)
            if layout is None:
                continue
            folder, count = layout
            self.take(setting, folder)
            self.result.taken.append(f"{found} subsets' image_dir and num_repeats")
            draws[found] = count
        for i, j, subset, _ in subsets:
            for key in subset:
                if key not in ("image_dir", "num_repeats", "is_reg", "class_tokens", *_SUBSET_OPTIONS):
                    self.not_taken(NO_EQUIVALENT, f"datasets[{i}].subsets[{j}].{key}", subset[key])
        if draws.get("training"):
            self.dataset_draws = draws["training"] * (2 if draws.get("regularization") else 1)

    def layout(self, subsets, what: str) -> tuple[str, int | None] | None:
        """The one folder lohatrain reads for these subsets and their draws an epoch (None when counting is not
        possible), or None (listed as not taken) when the subsets cannot be laid out so."""
        entries = [(Path(str(s.get("image_dir", ""))), _int_or(s.get("num_repeats"), 1),
                    next((t["class_tokens"] for t in (s, d, self.general) if t.get("class_tokens") is not None), None))
                   for _, _, s, d in subsets]
        option, value = f"{what} subsets' image_dir and num_repeats", {str(p): n for p, n, _ in entries}
        setting = "dataset_dir" if what == "training" else "reg_data_dir"
        if setting not in FIELDS:
            self.not_taken(NO_EQUIVALENT, option, value, "a regularization folder needs a newer lohatrain")
            return None
        if len(entries) == 1 and entries[0][1] == 1 and not REPEATS_FOLDER.fullmatch(entries[0][0].name):
            folder, _, tokens = entries[0]
            if tokens is not None:
                self.not_taken(NO_EQUIVALENT, "class_tokens", tokens, "lohatrain reads class tokens from N_name "
                                                                      "folder names")
            return str(folder), _count_draws(folder.expanduser(), self.may_read)[0]
        parents = {p.parent for p, _, _ in entries}
        wrong = [f"{p.name} (num_repeats {n})" for p, n, _ in entries
                 if not (m := REPEATS_FOLDER.fullmatch(p.name)) or int(m.group(1)) != n]
        if not KOHYA_FOLDERS:
            why = "this lohatrain trains one flat folder of images (repeats 1)"
        elif len(parents) > 1:
            why = "they are not in one folder"
        elif wrong:
            why = f"not named N_name with N its num_repeats: {', '.join(wrong)}"
        else:
            why = ""
        if why:
            self.not_taken(NO_EQUIVALENT, option, value, "lohatrain reads repeats from sub-folder names: put each "
                           "subset's images in a sub-folder of one folder, named N_name with N its num_repeats "
                           f"(10_alice); {why}")
            return None
        parent = parents.pop()
        for path, _, tokens in entries:
            name = REPEATS_FOLDER.fullmatch(path.name).group(2)
            if tokens is not None and str(tokens) != name:
                self.not_taken(NO_EQUIVALENT, f"class_tokens of {path.name}", tokens, "lohatrain captions an image "
                               f"without a caption file with its folder's name after N_: {name!r}")
        listed = {p.name for p, _, _ in entries}
        others = _other_repeat_folders(parent, listed, self.may_read)
        if others:
            self.not_taken(NO_EQUIVALENT, option, value, f"{parent} has more N_name sub-folders, which lohatrain "
                                                        f"would train too: {', '.join(others)} (move them out)")
        return str(parent), _count_draws(parent.expanduser(), self.may_read)[0]

    def rest(self) -> None:
        """Every argument not dealt with yet: quiet when at its default, else listed by why."""
        families = {name for switch, name in _FAMILY_SWITCHES.items() if self.args.get(switch)}
        for name, value in self.args.items():
            if name in self.done or self.label(name) is None:
                continue
            if name in _FAMILY_SWITCHES:
                self.skip(name, OTHER_FAMILY, why="lohatrain trains SD 1.x, SD 2.x and SDXL")
            elif _is_default(name, value):
                self.used(name)
            elif families and _FAMILY_FIELDS.match(name):
                self.skip(name, OTHER_FAMILY)
            elif name in _OWN_WAY:
                self.skip(name, OWN_WAY, why="the loaded model decides" if name in _MODEL_CHOICE else "")
            elif name in ("network_weights", "lora_network_weights"):
                self.skip(name, why="lohatrain starts from a file in its output folder: init_from")
            else:
                self.skip(name)

    def drop_refused(self) -> None:
        """Values lohatrain refuses are taken out and listed with the reason, until the rest is accepted."""
        for _ in range(len(self.settings) + 1):
            data = {**self.settings, "dataset_dir": self.settings.get("dataset_dir") or "-"}
            try:
                TrainSettings.from_dict(data, self.family)
                return
            except SettingsError as e:
                problems = e.problems
            refused = {}
            for problem in problems:
                key = next((k for k in sorted(self.settings, key=len, reverse=True)
                            if problem.startswith(k) and problem[len(k):len(k) + 1] in (" ", ":")), None)
                if key is not None:
                    refused.setdefault(key, problem)
            if not refused:
                for problem in problems:
                    self.not_taken(REFUSED, problem)
                return
            for key, problem in refused.items():
                value = self.settings.pop(key)
                origin = ", ".join(self.sources.get(key, [])) or _ORIGINS.get(key, key)
                for label in self.sources.get(key, []):
                    if label in self.result.taken:
                        self.result.taken.remove(label)
                self.not_taken(REFUSED, origin, value, problem)


def _network_args(value) -> dict:
    """sd-scripts' network_args (["conv_dim=4", "algo=loha"]) or the GUI's (a dict) as plain values by name."""
    if isinstance(value, (list, tuple)):
        value = dict(str(item).partition("=")[::2] for item in value)
    value = value if isinstance(value, dict) else {}
    return {str(k).strip(): _plain(v.strip().strip('"') if isinstance(v, str) else v) for k, v in value.items()}


def _multiple_of_64(side: float) -> int:
    return max(64, int(round(side / 64)) * 64)


def _constructor_arguments(name: str) -> set[str] | None:
    """The arguments the optimizer's constructor takes, or None when its package is not here to ask."""
    try:
        cls = optimizers.optimizer_class(name)
    except LohatrainError:
        return None
    return set(inspect.signature(cls.__init__).parameters) - {"self", "params", "lr"}


def _count_draws(folder: Path, may_read) -> tuple[int | None, str]:
    """The images lohatrain trains from `folder` in an epoch, with kohya's repeats: its own images, or the images of
    its `N_name` sub-folders times N; (None, why) when it cannot be read."""
    try:
        if not may_read(folder):
            return None, f"{folder} may not be read from here"
        _, images = ds.list_folder(folder)
        if images:
            return len(images), ""
        draws = 0
        if KOHYA_FOLDERS:
            for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
                match = REPEATS_FOLDER.fullmatch(sub.name)
                if match:
                    draws += int(match.group(1)) * len(ds.list_folder(sub)[1])
    except (OSError, LohatrainError) as e:
        return None, f"{folder} cannot be read ({e})"
    return (draws, "") if draws else (None, f"{folder} holds no images lohatrain trains")


def _other_repeat_folders(parent: Path, listed: set[str], may_read) -> list[str]:
    try:
        if not may_read(parent):
            return []
        return sorted(p.name for p in parent.expanduser().iterdir()
                      if p.is_dir() and REPEATS_FOLDER.fullmatch(p.name) and p.name not in listed)
    except (OSError, LohatrainError):
        return []
