"""The .safetensors file: where it goes, its kohya-style metadata, and a write that is all or nothing."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from . import optimizers
from .dataset import FolderCount
from .errors import LohatrainError
from .methods import TYPES
from .settings import TIMESTEPS, TrainSettings, check_file_name

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
STATE_SUFFIX = ".lohatrain-state"  # a run's resumable state (lohatrain.run_state); not a Lora file


@dataclass(frozen=True)
class OutputPlan:
    folder: Path
    name: str

    @property
    def final(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    def intermediate(self, step: int) -> Path:
        return self.folder / f"{self.name}-{step}.safetensors"

    @property
    def state_file(self) -> Path:
        return self.folder / f"{self.name}{STATE_SUFFIX}"

    @property
    def settings_file(self) -> Path:
        return self.folder / f"{self.name}.lohatrain.json"

    @property
    def card_file(self) -> Path:
        """The WebUI's per-network user metadata (activation text, notes) lives in `<name>.json`."""
        return self.folder / f"{self.name}.json"


def plan_output(settings: TrainSettings, folder: str | Path, resuming: bool = False) -> OutputPlan:
    """Check before training starts that the file can be written, so nobody waits an hour for an error.

    A resumed run replaces its own files. Temporary files a killed process left behind for this name (see
    `write_atomically`) are removed."""
    problem = check_file_name(settings.name)
    if problem:
        raise LohatrainError(problem)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LohatrainError(f"cannot create the output folder {folder.name!r}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise LohatrainError(f"the output folder {folder.name!r} is not writable")
    plan = OutputPlan(folder, settings.name)
    own_temporary = re.compile(rf"\.{re.escape(settings.name)}(-\d+)?\.(safetensors|lohatrain-state|lohatrain\.json|"
                               rf"json)\.[0-9a-f]{{12}}\.tmp")
    for leftover in folder.glob(".*.tmp"):
        if own_temporary.fullmatch(leftover.name):
            leftover.unlink(missing_ok=True)
    if plan.final.exists() and not settings.overwrite and not resuming:
        raise LohatrainError(f"{plan.final.name} already exists in the output folder ({folder.name}): choose "
                             "another name, or turn on 'overwrite' to replace it")
    return plan


def timestamp() -> int:
    """Now, or SOURCE_DATE_EPOCH when set (the reproducible-builds convention), for byte-identical files."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return int(epoch) if epoch and epoch.isdigit() else int(time.time())


def build_metadata(settings: TrainSettings, *, family_metadata: dict, model_name: str, model_hash: str,
                   clip_skip: int | None, folders: list[FolderCount], bucket_counts: dict,
                   steps_done: int, started_at: int, batches_per_epoch: int, seed: int, processes: int = 1,
                   extra: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's `ss_*` keys (what the WebUI's Lora tab and other tools read), plus our own settings.

    `folders`: the run's image folders (lohatrain.dataset.folder_counts). `processes`: how many data-parallel
    processes shared each batch (lohatrain.distributed)."""
    dirs, reg_dirs, tag_frequency = _dataset_dirs(settings, folders)
    image_count = sum(d["n_repeats"] * d["img_count"] for d in dirs.values())  # kohya's: with repeats
    module, args = TYPES[settings.training_method].network_module_and_args(settings)
    meta = {
        "ss_network_module": module,
        "ss_network_args": json.dumps(args, sort_keys=True),
        "ss_network_dim": str(settings.dim),
        "ss_network_alpha": str(settings.alpha),
        "ss_output_name": settings.name,
        "ss_sd_model_name": model_name,
        "ss_sd_model_hash": model_hash,
        "ss_resolution": f"({settings.resolution}, {settings.resolution})",
        "ss_clip_skip": str(clip_skip) if clip_skip else "None",
        "ss_num_train_images": str(image_count),
        "ss_tag_frequency": json.dumps(tag_frequency, sort_keys=True),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": list(b), "count": n} for i, (b, n)
                                                  in enumerate(sorted(bucket_counts.items()))}}),
        "ss_enable_bucket": str(settings.bucketing),
        "ss_learning_rate": str(settings.learning_rate),
        "ss_unet_lr": str(settings.learning_rate),
        "ss_text_encoder_lr": str(settings.text_encoder_lr),
        "ss_lr_scheduler": settings.lr_scheduler,
        "ss_lr_warmup_steps": str(settings.lr_warmup_steps),
        "ss_max_train_steps": str(settings.steps),
        "ss_steps": str(steps_done),
        "ss_epoch": str(-(-steps_done // max(batches_per_epoch, 1))),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_batch_size_per_device": str(settings.batch_size // processes),
        "ss_total_batch_size": str(settings.batch_size),
        "ss_seed": str(seed),
        "ss_mixed_precision": settings.train_dtype,
        "ss_save_precision": settings.save_dtype,
        "ss_gradient_checkpointing": str(settings.gradient_checkpointing),
        "ss_shuffle_caption": str(settings.shuffle_tags),
        "ss_keep_tokens": str(settings.keep_tokens),
        "ss_flip_aug": str(settings.flip_aug),
        "ss_color_aug": str(settings.color_aug),
        "ss_noise_offset": str(settings.noise_offset),
        "ss_min_snr_gamma": str(settings.min_snr_gamma),
        "ss_zero_terminal_snr": str(settings.zero_terminal_snr),
        "ss_optimizer": optimizers.ss_optimizer(settings),
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(timestamp()),
        "ss_caption_mode": settings.caption_mode,
        "lohatrain_settings": json.dumps(_shareable_settings(settings, seed), sort_keys=True),
    }
    if reg_dirs:
        meta["ss_reg_dataset_dirs"] = json.dumps(reg_dirs)
        meta["ss_num_reg_images"] = str(sum(d["n_repeats"] * d["img_count"] for d in reg_dirs.values()))
        meta["ss_prior_loss_weight"] = str(settings.prior_loss_weight)
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate", "keep_tokens_separator"):
        if getattr(settings, key):
            meta[f"ss_{key}"] = str(getattr(settings, key))
    meta.update(loss_and_noise_metadata(settings))
    meta.update(family_metadata)
    meta.update(extra or {})
    return meta


def _dataset_dirs(settings: TrainSettings, folders: list[FolderCount]) -> tuple[dict, dict, dict]:
    """kohya's `ss_dataset_dirs` and `ss_reg_dataset_dirs` ({folder: {"n_repeats", "img_count"}}) and
    `ss_tag_frequency` ({folder: {tag: count}}, the regularization folders' too); images directly in the chosen
    folder go under its name."""
    dirs, reg_dirs, tags = {}, {}, {}
    for folder in folders:
        own = settings.reg_data_dir if folder.regularization else settings.dataset_dir
        name = folder.name or Path(own).name or "dataset"
        (reg_dirs if folder.regularization else dirs)[name] = {"n_repeats": folder.repeats, "img_count": folder.images}
        merged = tags.setdefault(name, {})  # kohya counts a folder name used on both sides together
        for tag, count in folder.tags.items():
            merged[tag] = merged.get(tag, 0) + count
    return dirs, reg_dirs, tags


def loss_and_noise_metadata(settings: TrainSettings) -> dict[str, str]:
    """kohya's keys for the loss and noise options (train_network.py's, and sai_model_spec's timestep range), each
    only while its option is on, so a run with them off writes the same file as before they existed. kohya writes
    no key for masked loss: `lohatrain_settings` records it."""
    s, meta = settings, {}
    if s.multires_noise_iterations:
        meta["ss_multires_noise_iterations"] = str(s.multires_noise_iterations)
        meta["ss_multires_noise_discount"] = str(s.multires_noise_discount)
    if s.ip_noise_gamma:
        meta["ss_ip_noise_gamma"] = str(s.ip_noise_gamma)
    if s.debiased_estimation_loss:
        meta["ss_debiased_estimation"] = "True"
    if s.loss_type != "l2":
        meta["ss_loss_type"] = s.loss_type
    if s.loss_type in ("huber", "smooth_l1"):
        meta.update(ss_huber_schedule=s.huber_schedule, ss_huber_c=str(s.huber_c), ss_huber_scale=str(s.huber_scale))
    if (s.min_timestep, s.max_timestep) != (0, TIMESTEPS):
        meta["modelspec.timestep_range"] = f"{s.min_timestep},{s.max_timestep}"
    return meta


def _shareable_settings(settings: TrainSettings, seed: int) -> dict:
    """The settings for the file's metadata (`recorded`): LoRA files get shared, so no local paths, only the
    folder names."""
    data = {**settings.recorded(), "seed": seed, "dataset_dir": Path(settings.dataset_dir).name}
    if "reg_data_dir" in data:
        data["reg_data_dir"] = Path(settings.reg_data_dir).name
    del data["output_dir"]
    return data


def safetensors_file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with the header's keys sorted and `sshs_model_hash` set.

    safetensors' writer orders the header by a hash map that differs per process; rewriting the header
    sorted (same offsets, padded to the 8-byte alignment) makes identical runs give identical bytes.
    """
    raw = safetensors_bytes(tensors, metadata=dict(metadata))
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = raw[8 + header_len:]
    # kohya's model hash: sha256 of the tensor data, which the WebUI shows and puts in infotexts.
    header["__metadata__"]["sshs_model_hash"] = hashlib.sha256(data).hexdigest()
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def write_atomically(path: Path, content: bytes, overwrite: bool) -> None:
    """Write to a temporary file beside `path`, then rename: readers see the old file or the whole new one."""
    if path.exists() and not overwrite:
        raise LohatrainError(f"{path.name} already exists in {path.parent}; nothing was overwritten")
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Mode 0o666 filtered by the process umask by the OS itself, the permissions any new file gets (mkstemp's
    # are owner-only); the process-wide umask is never changed, so other threads' files are not affected.
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise LohatrainError(f"the disk holding {path.parent} is full: {path.name} needs "
                                 f"{len(content) / 2**20:.1f} MB. Free some space and train again.") from None
        if isinstance(e, OSError):
            raise LohatrainError(f"could not write {path}: {e.strerror or e}") from None
        raise


def save_network(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> Path:
    write_atomically(path, safetensors_file_bytes(tensors, metadata), overwrite)
    return path


def write_sidecars(plan: OutputPlan, settings: TrainSettings, seed: int, activation_text: str,
                   notes: str, sd_version: str) -> None:
    """The settings JSON (to train again) and the WebUI card's activation text, beside the file."""
    saved = json.dumps({**settings.recorded(), "seed": seed}, indent=2, sort_keys=True) + "\n"
    write_atomically(plan.settings_file, saved.encode(), overwrite=True)
    card = {"description": notes, "activation text": activation_text, "sd version": sd_version,
            "preferred weight": 0, "notes": notes}
    if not plan.card_file.exists() or settings.overwrite:
        write_atomically(plan.card_file, (json.dumps(card, indent=4, sort_keys=True) + "\n").encode(),
                         overwrite=True)
