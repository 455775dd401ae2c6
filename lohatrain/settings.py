"""Every training setting in one typed object: defaults, presets, validation, JSON.

The tab, the REST API, the command line and the tests all build a `TrainSettings`; nothing else decides a
default. Validation collects every bad value at once, so a user fixes a form in one go.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from . import optimizers
from .errors import SettingsError  # noqa: F401  (callers take it from here)
from .methods import TYPES, NetworkType
from .targets import BLOCK_WEIGHTS, DEFAULT_TARGETS, TARGETS, weights_problem

CAPTION_MODES = ("none", "phrase", "txt")
DTYPES = ("fp16", "bf16", "fp32")
SCHEDULERS = ("constant", "cosine", "linear")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # kohya sd-scripts' loss_type
HUBER_SCHEDULES = ("snr", "exponential", "constant")  # kohya's huber_schedule
TIMESTEPS = 1000  # every SD family's noise schedule
DEFAULT_METHOD = "loha"


def network_type(method: str) -> NetworkType:
    """The type a `training_method` names; the default type's for one that does not exist (validation says so)."""
    return TYPES.get(method, TYPES[DEFAULT_METHOD])


# What else differs by family: its native resolution (and buckets around it), a batch that fits 8 GB with
# gradient checkpointing.
FAMILY_DEFAULTS = {
    "sd1": {"resolution": 512, "bucket_min_side": 256, "bucket_max_side": 1024, "batch_size": 4},
    "sd2": {"resolution": 768, "bucket_min_side": 384, "bucket_max_side": 1536, "batch_size": 2},
    "sdxl": {"resolution": 1024, "bucket_min_side": 512, "bucket_max_side": 2048, "batch_size": 1},
}


def bucket_sides_for(resolution: int) -> tuple[int, int]:
    """The bucket sides that go with a resolution when the user sets none: half and twice it (as every
    family's defaults), so a 256 px run gets 128–512 px buckets and never a side beyond its own resolution."""
    return max(64, resolution // 2 // 64 * 64), resolution * 2


DEFAULT_PRESET = "highest"  # the original product's recommendation
PRESET_NAMES = tuple(TYPES[DEFAULT_METHOD].presets["sd1"])  # every type's, on every family
_DEFAULT_SIZE = TYPES[DEFAULT_METHOD].presets["sd1"][DEFAULT_PRESET]
_SIZE_KEYS = ("dim", "alpha", "conv_dim", "conv_alpha")
CUSTOM_PRESET = "custom"
# Settings about this machine and this click, not about the network: the file and its settings JSON leave them out.
RUN_CHOICES = ("ignore_memory_estimate",)


def _added(default):
    """A setting added after lohatrain's files were first shared: files record it only when it is set away from its
    default, so a run that does not use it writes the same bytes as before it existed."""
    return field(default=default, metadata={"recorded_when_set": True})


_RESERVED_NAMES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
_BAD_NAME_CHARS = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


@dataclass
class TrainSettings:
    """What the user chose. Names match the JSON file, the REST API and the `ss_*` metadata."""

    name: str = "my-loha"
    dataset_dir: str = ""
    output_dir: str = ""  # the WebUI fills in its Lora folder; the command line requires it
    training_method: str = DEFAULT_METHOD  # lora, locon, loha or lokr (lohatrain.methods)
    dora: bool = False  # DoRA's weight decomposition on top of lora, locon or loha
    lokr_factor: int = -1  # LoKr: the Kronecker factor, -1 = as square as possible (LyCORIS' default)
    caption_mode: str = "txt"
    caption_phrase: str = ""
    caption_ext: str = ".txt"
    resolution: int = 512
    bucketing: bool = True
    bucket_min_side: int = 256
    bucket_max_side: int = 1024
    learning_rate: float = 1e-3
    text_encoder_lr: float = 0.0
    steps: int = 800
    batch_size: int = 4
    network_preset: str = DEFAULT_PRESET
    dim: int = _DEFAULT_SIZE.dim
    alpha: float = _DEFAULT_SIZE.alpha
    conv_dim: int = _DEFAULT_SIZE.conv_dim
    conv_alpha: float = _DEFAULT_SIZE.conv_alpha
    clip_skip: int | None = None  # None: whatever the host uses now; 1 = last layer (0 is read as 1)
    train_dtype: str = "fp16"
    save_dtype: str = "fp16"
    gradient_checkpointing: bool = True
    seed: int = -1  # -1: a random seed, chosen at start and recorded in the file
    deterministic: bool = False  # GPU: torch's deterministic algorithms (CPU runs always are)
    shuffle_tags: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    color_aug: bool = False
    save_every_steps: int = 0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the usual value
    zero_terminal_snr: bool = False  # v-prediction models only: rescale the noise schedule to SNR 0 at the end
    overwrite: bool = False
    keep_state: bool = False  # keep the finished run's state, to train it further later (lohatrain.run_state)
    init_from: str = ""  # a file of the same type and size in the output folder to start from (e.g. to train on)
    preview_every_steps: int = 0
    preview_prompts: list[str] = field(default_factory=list)
    preview_seed: int = 1234  # previews and the steps × strength grid: one seed, so images compare
    preview_steps: int = 20
    preview_sampler: str = "DPM++ 2M"  # a sampler name of the host's txt2img
    # Every setting below (the options people know from kohya: issue 21) is recorded in a file's lohatrain_settings
    # only when set away from its default (`_added`), so runs without them write the same files as before.
    # Network targets and block learning-rate weights (lohatrain.targets):
    network_targets: str = _added(DEFAULT_TARGETS)  # attn-only, attn-mlp, full
    down_lr_weight: str = _added("")  # kohya's: "" = off, a comma list or a curve
    mid_lr_weight: str = _added("")
    up_lr_weight: str = _added("")
    block_lr_zero_threshold: float = _added(0.0)  # at or below: that block not trained
    # Masked loss, loss and noise, by kohya sd-scripts' names and defaults (all off by default):
    masked_loss: bool = _added(False)
    multires_noise_iterations: int = _added(0)  # 0 = off
    multires_noise_discount: float = _added(0.3)
    ip_noise_gamma: float = _added(0.0)  # 0 = off
    debiased_estimation_loss: bool = _added(False)
    loss_type: str = _added("l2")
    huber_schedule: str = _added("snr")
    huber_c: float = _added(0.1)
    huber_scale: float = _added(1.0)
    min_timestep: int = _added(0)
    max_timestep: int = _added(TIMESTEPS)
    # Optimizers (lohatrain.optimizers):
    optimizer: str = _added(optimizers.DEFAULT)  # adamw, adamw8bit, prodigy, lion or adafactor
    optimizer_args: str = _added("")  # more constructor arguments, kohya's form: "weight_decay=0.05 betas=0.9,0.99"
    weight_decay: float | None = _added(None)  # None: the optimizer's own (AdamW 0.01, the others 0)
    prodigy_d_coef: float = _added(1.0)
    prodigy_bias_correction: bool = _added(False)
    prodigy_safeguard_warmup: bool = _added(False)
    adafactor_relative_step: bool = _added(True)  # False: a fixed rate, the learning rate and its schedule
    # kohya's dataset shapes (`N_name` sub-folders of dataset_dir need no setting):
    reg_data_dir: str = _added("")  # class images, flat or in `N_name` folders
    prior_loss_weight: float = _added(1.0)  # the regularization images' loss ×
    caption_dropout_rate: float = _added(0.0)  # a drawn image's caption emptied
    caption_tag_dropout_rate: float = _added(0.0)  # each free tag left out
    keep_tokens_separator: str = _added("")  # tags before it stay first
    # The memory estimate (lohatrain.memory): a run the estimate says does not fit the GPU starts only with this
    # on. About this machine, not the network: not written into the file (RUN_CHOICES).
    ignore_memory_estimate: bool = False

    @classmethod
    def defaults_for(cls, family: str, method: str = DEFAULT_METHOD) -> "TrainSettings":
        """The defaults for a model family ("sd1", "sd2", "sdxl") and training method: resolution, batch,
        learning rate and presets."""
        return dataclasses.replace(cls(), training_method=method, learning_rate=TYPES[method].learning_rate_for(family),
                                   **FAMILY_DEFAULTS[family]).with_preset(DEFAULT_PRESET, family)

    @classmethod
    def from_dict(cls, data: dict, family: str = "sd1") -> "TrainSettings":
        """Build from JSON-like data; what it leaves out comes from the family's defaults, and a preset (of
        the family's) fills the sizes it sets unless they are given explicitly."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SettingsError([f"unknown setting {k!r}" for k in unknown])
        type_problems = _type_problems(data)
        if type_problems:  # before anything below reads a value of the wrong type
            raise SettingsError(type_problems)
        kind = network_type(data.get("training_method", DEFAULT_METHOD))
        given = data
        learning_rate = optimizers.PRODIGY_LR if data.get("optimizer") == "prodigy" else kind.learning_rate_for(family)
        data = {**FAMILY_DEFAULTS[family], "learning_rate": learning_rate, **data}
        if "resolution" in given:  # bucket sides the user left out follow the resolution the user gave
            low, high = bucket_sides_for(data["resolution"])
            data["bucket_min_side"] = given.get("bucket_min_side", low)
            data["bucket_max_side"] = given.get("bucket_max_side", high)
        presets = kind.presets[family]
        preset = presets.get(data.get("network_preset", DEFAULT_PRESET))
        # "custom" fills the sizes it leaves out from the default preset of the family and method
        data.setdefault("lokr_factor", (preset or presets[DEFAULT_PRESET]).factor)
        for key in _SIZE_KEYS:
            data.setdefault(key, getattr(preset or presets[DEFAULT_PRESET], key))
        if preset is not None and any(data[k] != getattr(preset, k) for k in _SIZE_KEYS) or (
                preset is not None and data["lokr_factor"] != preset.factor and kind.sized_by_factor):
            data["network_preset"] = CUSTOM_PRESET
        settings = cls(**data)
        settings.validate()
        return settings

    def with_preset(self, preset_name: str, family: str = "sd1") -> "TrainSettings":
        """A copy with the preset's sizes applied (the preset of this method, on the family)."""
        preset = network_type(self.training_method).presets[family][preset_name]
        return dataclasses.replace(self, network_preset=preset_name, dim=preset.dim, alpha=preset.alpha,
                                   conv_dim=preset.conv_dim, conv_alpha=preset.conv_alpha, lokr_factor=preset.factor)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recorded(self) -> dict:
        """`to_dict` less the settings added later (`_added`) left at their defaults and those about this machine
        (RUN_CHOICES): what a file records."""
        return {k: v for f, (k, v) in zip(dataclasses.fields(self), self.to_dict().items())
                if k not in RUN_CHOICES and not (f.metadata.get("recorded_when_set") and v == f.default)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path, family: str = "sd1") -> "TrainSettings":
        return cls.from_dict(read_settings_file(path), family)

    @property
    def effective_clip_skip(self) -> int | None:
        return None if self.clip_skip is None else max(1, self.clip_skip)

    def problems(self) -> list[str]:
        """Every invalid value, one plain-language message each (empty when all is well)."""
        p = _type_problems(self.to_dict())
        if p:  # the range checks below assume each value has its declared type
            return p
        name_problem = check_file_name(self.name)
        if name_problem:
            p.append(name_problem)
        if not str(self.dataset_dir).strip():
            p.append("dataset_dir: choose the folder that holds your training images")
        kind = TYPES.get(self.training_method)
        if kind is None:
            p.append(f"training_method must be one of {', '.join(TYPES)}, not {self.training_method!r}")
        else:
            p += kind.problems(self)
        if not _is_int(self.lokr_factor) or not (self.lokr_factor == -1 or 2 <= self.lokr_factor <= 1024):
            p.append(f"lokr_factor must be -1 (automatic) or a whole number from 2 to 1024, not {self.lokr_factor!r}")
        if self.caption_mode not in CAPTION_MODES:
            p.append(f"caption_mode must be one of {', '.join(CAPTION_MODES)}, not {self.caption_mode!r}")
        if self.caption_mode == "phrase" and not self.caption_phrase.strip():
            p.append("caption_phrase: type the phrase every image is trained with (or pick another caption mode)")
        if self.caption_mode == "txt" and not re.fullmatch(r"\.[A-Za-z0-9_]+", self.caption_ext or ""):
            p.append(f"caption_ext must look like '.txt', not {self.caption_ext!r}")
        _int_range(p, "resolution", self.resolution, 64, 4096, multiple=64)
        _int_range(p, "bucket_min_side", self.bucket_min_side, 64, 4096, multiple=64)
        _int_range(p, "bucket_max_side", self.bucket_max_side, 64, 8192, multiple=64)
        if _is_int(self.bucket_min_side) and _is_int(self.bucket_max_side) and _is_int(self.resolution):
            if self.bucket_min_side > self.resolution or self.bucket_max_side < self.resolution:
                p.append("bucket_min_side must be at most, and bucket_max_side at least, the resolution")
        _float_range(p, "learning_rate", self.learning_rate, 0, 1, low_open=True)
        _float_range(p, "text_encoder_lr", self.text_encoder_lr, 0, 1)
        _int_range(p, "steps", self.steps, 1, 1_000_000)
        _int_range(p, "batch_size", self.batch_size, 1, 256)
        if self.network_preset not in PRESET_NAMES and self.network_preset != CUSTOM_PRESET:
            p.append(f"network_preset must be one of {', '.join([*PRESET_NAMES, CUSTOM_PRESET])}")
        _int_range(p, "dim", self.dim, 1, network_type(self.training_method).max_dim)
        _float_range(p, "alpha", self.alpha, 0, 1024, low_open=True)
        _int_range(p, "conv_dim", self.conv_dim, 0, 256)
        if self.conv_dim:
            _float_range(p, "conv_alpha", self.conv_alpha, 0, 1024, low_open=True)
        if self.clip_skip is not None:
            _int_range(p, "clip_skip", self.clip_skip, 0, 12)
        for key in ("train_dtype", "save_dtype"):
            if getattr(self, key) not in DTYPES:
                p.append(f"{key} must be one of {', '.join(DTYPES)}, not {getattr(self, key)!r}")
        _int_range(p, "seed", self.seed, -1, 2**32 - 1)
        _int_range(p, "keep_tokens", self.keep_tokens, 0, 1000)
        _int_range(p, "save_every_steps", self.save_every_steps, 0, 1_000_000)
        if self.lr_scheduler not in SCHEDULERS:
            p.append(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, not {self.lr_scheduler!r}")
        _int_range(p, "lr_warmup_steps", self.lr_warmup_steps, 0, 1_000_000)
        if _is_int(self.lr_warmup_steps) and _is_int(self.steps) and self.lr_warmup_steps >= self.steps > 0:
            p.append("lr_warmup_steps must be fewer than steps")
        _float_range(p, "noise_offset", self.noise_offset, 0, 1)
        _float_range(p, "min_snr_gamma", self.min_snr_gamma, 0, 100)
        _int_range(p, "preview_every_steps", self.preview_every_steps, 0, 1_000_000)
        _int_range(p, "preview_seed", self.preview_seed, 0, 2**32 - 1)
        _int_range(p, "preview_steps", self.preview_steps, 1, 150)
        if not isinstance(self.preview_sampler, str) or not self.preview_sampler.strip():
            p.append("preview_sampler must be the name of one of the WebUI's samplers")
        for key in ("dora", "bucketing", "gradient_checkpointing", "deterministic", "shuffle_tags", "flip_aug",
                    "color_aug", "overwrite", "zero_terminal_snr", "keep_state", "ignore_memory_estimate"):
            if not isinstance(getattr(self, key), bool):
                p.append(f"{key} must be true or false")
        if self.init_from and (check_file_name(self.init_from) or not self.init_from.endswith(".safetensors")):
            p.append(f"init_from must be the name of a .safetensors file in the output (Lora) folder, not "
                     f"{self.init_from!r}")
        if not isinstance(self.preview_prompts, list) or not all(isinstance(x, str) for x in self.preview_prompts):
            p.append("preview_prompts must be a list of prompts")
        if self.network_targets not in TARGETS:
            p.append(f"network_targets must be one of {', '.join(TARGETS)}, not {self.network_targets!r}")
        p += [problem for name in BLOCK_WEIGHTS if (problem := weights_problem(name, getattr(self, name)))]
        _float_range(p, "block_lr_zero_threshold", self.block_lr_zero_threshold, 0, 1000)
        return p + self._loss_and_noise_problems() + self._dataset_shape_problems()

    def _loss_and_noise_problems(self) -> list[str]:
        p = []  # the types are checked already (_type_problems)
        _int_range(p, "multires_noise_iterations", self.multires_noise_iterations, 0, 100)
        _float_range(p, "multires_noise_discount", self.multires_noise_discount, 0, 1, low_open=True)
        _float_range(p, "ip_noise_gamma", self.ip_noise_gamma, 0, 1)
        if self.loss_type not in LOSS_TYPES:
            p.append(f"loss_type must be one of {', '.join(LOSS_TYPES)}, not {self.loss_type!r}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            p.append(f"huber_schedule must be one of {', '.join(HUBER_SCHEDULES)}, not {self.huber_schedule!r}")
        _float_range(p, "huber_c", self.huber_c, 0, 1, low_open=True)
        _float_range(p, "huber_scale", self.huber_scale, 0, 100, low_open=True)
        _int_range(p, "min_timestep", self.min_timestep, 0, TIMESTEPS - 1)
        _int_range(p, "max_timestep", self.max_timestep, 1, TIMESTEPS)
        if self.min_timestep >= self.max_timestep:
            p.append(f"min_timestep ({self.min_timestep}) must be below max_timestep ({self.max_timestep})")
        if self.weight_decay is not None:
            _float_range(p, "weight_decay", self.weight_decay, 0, 10)
        _float_range(p, "prodigy_d_coef", self.prodigy_d_coef, 0, 100, low_open=True)
        for key in ("prodigy_bias_correction", "prodigy_safeguard_warmup", "adafactor_relative_step"):
            if not isinstance(getattr(self, key), bool):
                p.append(f"{key} must be true or false")
        p += optimizers.problems(self)
        return p

    def _dataset_shape_problems(self) -> list[str]:
        p = []
        _float_range(p, "prior_loss_weight", self.prior_loss_weight, 0, 100)
        _float_range(p, "caption_dropout_rate", self.caption_dropout_rate, 0, 1)
        _float_range(p, "caption_tag_dropout_rate", self.caption_tag_dropout_rate, 0, 1)
        if self.keep_tokens_separator and (not self.keep_tokens_separator.strip() or "," in self.keep_tokens_separator):
            p.append(f"keep_tokens_separator must be a mark that is not in your tags, such as |||, not "
                     f"{self.keep_tokens_separator!r} (no comma, not only spaces)")
        return p

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise SettingsError(problems)


def read_settings_file(path: str | Path) -> dict:
    """A settings JSON as a dict, not yet checked (the command line merges its options into it first)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError([f"settings file {path} does not exist"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError([f"settings file {path} is not valid JSON: {e}"]) from None
    if not isinstance(data, dict):
        raise SettingsError([f"settings file {path} must hold a JSON object"])
    return data


# One line per setting for the command line's --help (its default is added there, per family where it differs).
SETTING_HELP = {
    "name": "the file's name, and the alias in <lora:name:1>",
    "dataset_dir": "the folder of training images (and their captions)",
    "output_dir": "where the .safetensors goes (required on the command line; the WebUI uses its Lora folder)",
    "training_method": f"network type: {', '.join(TYPES)}",
    "dora": "DoRA's weight decomposition on top of lora, locon or loha",
    "lokr_factor": "LoKr's Kronecker factor, -1 = as square as possible (set by network_preset unless given)",
    "caption_mode": "none, phrase (caption_phrase for every image) or txt (a caption file beside each image)",
    "caption_phrase": "every image's caption, with caption_mode phrase",
    "caption_ext": "the caption files' extension, with caption_mode txt",
    "resolution": "training side in pixels, a multiple of 64",
    "bucketing": "group images by aspect ratio instead of cropping them square",
    "bucket_min_side": "the smallest bucket side in pixels (unless given: half the resolution)",
    "bucket_max_side": "the largest bucket side in pixels (unless given: twice the resolution)",
    "learning_rate": "the UNet's learning rate (unless given: 1e-4 for lora and locon, 1e-3 for loha and lokr, "
                     "halved on SDXL; 1.0 with prodigy, which finds the step size itself)",
    "text_encoder_lr": "the text encoder's learning rate, 0 = the UNet only",
    "steps": "training steps",
    "batch_size": "images per step",
    "network_preset": f"network size: {', '.join(PRESET_NAMES)} (sets dim, alpha, conv_dim, conv_alpha for the type "
                      "and family), or custom",
    "dim": "rank of the linear layers (set by network_preset unless given)",
    "alpha": "alpha of the linear layers, the delta is scaled by alpha / dim (set by network_preset unless given)",
    "conv_dim": "rank of the 3x3 convolutions, 0 = not trained (set by network_preset unless given)",
    "conv_alpha": "alpha of the 3x3 convolutions (set by network_preset unless given)",
    "clip_skip": "SD 1.x's CLIP skip: 1 = the last layer, 2 = the one before (unset: the last)",
    "train_dtype": f"precision the model is held and trained in: {', '.join(DTYPES)} (on a CPU fp32 unless given)",
    "save_dtype": f"precision of the saved file: {', '.join(DTYPES)}",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, slower steps",
    "seed": "random seed, -1 = a random one (recorded in the file)",
    "deterministic": "torch's deterministic algorithms on the GPU (CPU runs always are)",
    "shuffle_tags": "shuffle a caption's comma-separated tags every step",
    "keep_tokens": "leading tags that stay in place when shuffling",
    "flip_aug": "mirror images at random",
    "color_aug": "vary hue, saturation and brightness at random",
    "save_every_steps": "also save every N steps, 0 = only at the end",
    "lr_scheduler": f"learning-rate schedule: {', '.join(SCHEDULERS)}",
    "lr_warmup_steps": "steps of linear warm-up",
    "noise_offset": "noise offset (lets the model learn very dark and very bright images), 0 = off",
    "min_snr_gamma": "Min-SNR loss weighting gamma, 0 = off (5 is usual)",
    "zero_terminal_snr": "rescale the noise schedule to zero SNR at the last step (v-prediction models only)",
    "overwrite": "replace an existing file of the same name",
    "keep_state": "keep the finished run's state, to train it further later",
    "init_from": "start from this .safetensors in the output folder (same type and size)",
    "preview_every_steps": "a preview image every N steps (in the WebUI only)",
    "preview_prompts": "the previews' prompts (in the WebUI only)",
    "preview_seed": "the previews' and the steps × strength grid's seed (in the WebUI only)",
    "preview_steps": "the previews' and the grid's sampling steps (in the WebUI only)",
    "preview_sampler": "the previews' and the grid's sampler, one of the WebUI's (in the WebUI only)",
    "network_targets": "what is adapted: attn-only (attention projections), attn-mlp (attention blocks whole; with "
                       "conv_dim > 0 also ResBlocks and samplers) or full (also conv_in, conv_out, the time and SDXL "
                       "label embeddings; 3x3 convolutions only with conv_dim > 0), as LyCORIS' presets",
    "down_lr_weight": "kohya's learning-rate weights of the down blocks (input_blocks 0-11, SDXL 0-8): comma-separated "
                      "(empty = 0, missing = 1) or a curve: sine, cosine, linear, reverse_linear, zeros, with +base",
    "mid_lr_weight": "kohya's learning-rate weight of the middle block (SDXL: 3, comma-separated)",
    "up_lr_weight": "kohya's learning-rate weights of the up blocks (output_blocks 0-11, SDXL 0-8), as down_lr_weight",
    "block_lr_zero_threshold": "block weights at or below this become 0: that block is not trained",
    "masked_loss": "weight the loss by each image's mask, its alpha channel or a <name>.mask.png beside it (white "
                   "trains, black does not)",
    "multires_noise_iterations": "multires (pyramid) noise levels, 0 = off (6 to 10 is usual)",
    "multires_noise_discount": "multires noise: each coarser level's strength relative to the one before",
    "ip_noise_gamma": "input-perturbation noise strength, 0 = off (0.1 is usual)",
    "debiased_estimation_loss": "weight each step's loss by 1/sqrt(SNR) (debiased estimation)",
    "loss_type": f"loss: {', '.join(LOSS_TYPES)}",
    "huber_schedule": f"huber and smooth_l1: how huber_c changes with the timestep: {', '.join(HUBER_SCHEDULES)}",
    "huber_c": "huber and smooth_l1: the threshold between quadratic and linear loss",
    "huber_scale": "huber and smooth_l1: a factor on huber_c (constant and exponential schedules)",
    "min_timestep": "the lowest timestep trained (0 to 999)",
    "max_timestep": f"the timestep trained up to, not included (1 to {TIMESTEPS})",
    "optimizer": f"{', '.join(optimizers.OPTIMIZERS)}; prodigy finds the step size itself, so its learning rates "
                 "are 1.0 unless given (they scale its estimate)",
    "optimizer_args": "more arguments for the optimizer, as kohya's --optimizer_args: \"weight_decay=0.05 "
                      "betas=0.9,0.99\" (checked against the optimizer's own arguments)",
    "weight_decay": "the optimizer's weight decay (unset: its own, 0.01 for adamw and adamw8bit, 0 for the others)",
    "prodigy_d_coef": "prodigy: scales its step-size estimate (0.5 to 2 are usual); the way to tune Prodigy",
    "prodigy_bias_correction": "prodigy: Adam's bias correction (use_bias_correction)",
    "prodigy_safeguard_warmup": "prodigy: keep the step-size estimate from growing during a warm-up "
                                "(safeguard_warmup; turn on with lr_warmup_steps)",
    "adafactor_relative_step": "adafactor: its own step size 1/sqrt(step), learning_rate unused (kohya's default); "
                               "off: a fixed rate, the learning rate and its schedule",
    "reg_data_dir": "kohya's regularization folder: class images (directly in it or in N_name sub-folders), drawn "
                    "as often as the training images",
    "prior_loss_weight": "the regularization images' weight in the loss",
    "caption_dropout_rate": "the chance (0 to 1) a drawn image trains with an empty caption",
    "caption_tag_dropout_rate": "the chance (0 to 1) each tag is left out of a drawn caption (the kept ones never)",
    "keep_tokens_separator": "a mark in captions (such as |||): the tags before it stay first, never shuffled or "
                             "dropped; a second one keeps the tags after it last (unset: keep_tokens)",
    "ignore_memory_estimate": "in the WebUI: start a run the memory estimate says does not fit the GPU's free memory "
                              "(the command line does not refuse; --estimate reports)",
}


def _type_problems(data: dict) -> list[str]:
    """The schema: each given value against its field's declared type (`int | None` allows null; a float field
    takes a whole number too; true/false is never a number), one message per field."""
    hints = typing.get_type_hints(TrainSettings)
    problems = []
    for key, value in data.items():
        expected = hints.get(key)
        if expected is None:
            continue
        options = typing.get_args(expected) if typing.get_origin(expected) in (typing.Union, types.UnionType) else (expected,)
        if not any(_has_type(value, t) for t in options):
            problems.append(f"{key} must be {' or '.join(_TYPE_WORDS.get(t, 'a list of texts') for t in options)}, "
                            f"not {json.dumps(value) if _jsonable(value) else type(value).__name__}")
    return problems


_TYPE_WORDS = {str: "a text", int: "a whole number", float: "a number", bool: "true or false", type(None): "null"}


def _has_type(value, expected) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return _is_int(value)
    if typing.get_origin(expected) is list:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    return isinstance(value, expected)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def check_file_name(name) -> str | None:
    """Why `name` cannot be the LoRA's file name, or None. It must stay inside the Lora folder."""
    if not isinstance(name, str) or not name.strip():
        return "name: give the LoRA a name (it becomes the file name and the <lora:name:1> tag)"
    if name != name.strip():
        return "name must not start or end with spaces"
    if _BAD_NAME_CHARS.search(name) or name in (".", "..") or name.startswith("."):
        return (f"name {name!r} must be a plain file name: no slashes, '..', leading dot "
                "or any of < > : \" | ? *")
    if name.split(".")[0].lower() in _RESERVED_NAMES:
        return f"name {name!r} is reserved by Windows; choose another"
    if len(name) > 100:
        return "name is too long (at most 100 characters)"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_range(problems, key, value, low, high, multiple=1):
    if not _is_int(value):
        problems.append(f"{key} must be a whole number, not {value!r}")
    elif not low <= value <= high:
        problems.append(f"{key} must be between {low} and {high}, not {value}")
    elif value % multiple:
        problems.append(f"{key} must be a multiple of {multiple}, not {value}")


def _float_range(problems, key, value, low, high, low_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        problems.append(f"{key} must be a number, not {value!r}")
    elif value < low or value > high or (low_open and value == low):
        bound = "above" if low_open else "at least"
        problems.append(f"{key} must be {bound} {low} and at most {high}, not {value}")
