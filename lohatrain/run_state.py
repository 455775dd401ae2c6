"""A run's state: what a stopped training needs to go on exactly where it stopped.

`LoopState` (lohatrain/loop.py) is what the loop changes from one step to the next: the step, the network's weights (float32), the
optimizer (whichever it is: its tensors in the file; its counters, and its groups with Prodigy's adapted step size,
in the header), the schedule, the fp16 loss scaler and every random stream the loop draws from (batch order, noise
and timesteps, augmentation, tag shuffling). Everything else a run uses is rebuilt the same way from the
settings and the seed (the images' VAE latents are drawn under per-image seeds), so saving and loading this is
all resume needs: a resumed run ends in the same file, byte for byte, as one that never stopped.

The state file `<name>.lohatrain-state` lies beside the run's `.safetensors` (the WebUI's Lora list reads
only `.safetensors`, `.pt` and `.ckpt`). It is a safetensors file (tensors and a JSON header, no pickle: a
shared state file cannot run code) holding the loop state plus what the run was made from: its settings,
seed, a fingerprint of the dataset (names, sizes, modification times, captions) and of the model, so a
resume into changed circumstances is refused with what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save as safetensors_bytes

from . import dataset as ds
from .errors import DatasetError, LohatrainError
from .loop import LoopState
from .output import STATE_SUFFIX, write_atomically
from .settings import TrainSettings

FORMAT = 1
HEADER_KEY = "lohatrain_state"


def _tensors_and_info(loop: LoopState, streams: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    streams = streams or loop.streams()
    tensors = {f"network.{k}": v.detach().to("cpu", torch.float32).contiguous()
               for k, v in loop.network.state_dict().items()}
    optimizer = loop.optimizer.state_dict()
    values = {}
    for path, value in _flat(optimizer["state"]):
        if isinstance(value, torch.Tensor):  # a copy: bitsandbytes shares one tensor between weights' states
            tensors[f"optimizer.{path}"] = value.detach().to("cpu", copy=True).contiguous()
        else:
            values[path] = value
    tensors["rng.sampler"] = streams["sampler"]["generator"]
    tensors["rng.noise"] = streams["noise"]
    tensors["rng.aug"] = streams["aug"]
    info = {
        "step": loop.step, "losses": loop.losses, "smooth": loop.smooth,
        "optimizer_groups": optimizer["param_groups"],
        "optimizer_values": values,
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else {},
        "sampler_pending": streams["sampler"]["pending"],
        "caption_rng": streams["caption"],
    }
    return tensors, info


def _flat(entries: dict, prefix: str = ""):
    """(path, value) for each value of an optimizer's state, nested dicts' keys joined with dots (`0.exp_avg`;
    bitsandbytes keeps its 8-bit buffers in a dict of their own)."""
    for key, value in entries.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def restore(loop: LoopState, saved: "SavedRun") -> None:
    """Put a saved state into a freshly built loop (the same network type and size)."""
    tensors, info = saved.tensors, saved.info
    device = next(loop.network.parameters()).device
    own = loop.network.state_dict()
    theirs = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    if set(own) != set(theirs) or any(own[k].shape != theirs[k].shape for k in own):
        raise LohatrainError(f"{saved.path.name} does not match this run's network (type or size): it cannot be "
                             "resumed with these settings")
    loop.network.load_state_dict({k: v.to(device) for k, v in theirs.items()})
    state: dict[int, dict] = {}
    entries = {**{k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")},
               **info.get("optimizer_values", {})}
    for path, value in entries.items():
        index, *keys = path.split(".")
        place = state.setdefault(int(index), {})
        for key in keys[:-1]:
            place = place.setdefault(key, {})
        place[keys[-1]] = value
    loop.optimizer.load_state_dict({"state": state, "param_groups": info["optimizer_groups"]})
    loop.scheduler.load_state_dict(info["scheduler"])
    if loop.scaler.is_enabled():
        loop.scaler.load_state_dict(info["scaler"])
    loop.sampler.load_state_dict(saved.sampler_state)
    loop.noise_gen.set_state(tensors["rng.noise"])
    loop.aug_gen.set_state(tensors["rng.aug"])
    version, internal, gauss = info["caption_rng"]
    loop.caption_rng.setstate((version, tuple(internal), gauss))
    loop.step, loop.losses, loop.smooth = info["step"], list(info["losses"]), info["smooth"]


@dataclass
class RunRecord:
    """What a state records about where the run came from, checked before it resumes."""

    settings: TrainSettings
    family: str
    seed: int
    started_at: int
    model_name: str
    model_id: str
    dataset: list[list]  # [file name, size, mtime_ns, caption] per image, then [name, size, mtime_ns] of its mask file


@dataclass
class SavedRun:
    """A state file read back: its tensors and header, and the run it records."""

    path: Path
    tensors: dict[str, torch.Tensor]
    info: dict
    note: str = ""  # for whoever resumes a `.safetensors`: the state, and the step, the run goes on from

    @property
    def step(self) -> int:
        return self.info["step"]

    @property
    def sampler_state(self) -> dict:
        """The batch sampler's state (`BucketBatchSampler.load_state_dict`)."""
        return {"generator": self.tensors["rng.sampler"], "pending": self.info["sampler_pending"]}

    @property
    def record(self) -> RunRecord:
        run = self.info["run"]
        settings = TrainSettings(**run["settings"])  # exactly as saved (from_dict would re-apply presets)
        settings.validate()
        return RunRecord(settings, run["family"], run["seed"],
                         run["started_at"], run["model_name"], run["model_id"], run["dataset"])

    def changes(self, model_id: str, dataset: list[list]) -> list[str]:
        """What differs now from when the state was saved, one phrase each (empty: resume exactly)."""
        run = self.info["run"]
        found = []
        if run["model_id"] != model_id:
            found.append(f"another checkpoint is loaded (the run was trained on {run['model_name']})")
        then = {entry[0]: entry for entry in run["dataset"]}
        now = {entry[0]: entry for entry in dataset}
        for label, names in (("added", sorted(set(now) - set(then))), ("removed", sorted(set(then) - set(now))),
                             ("edited", sorted(n for n in set(now) & set(then) if now[n][1:3] != then[n][1:3])),
                             ("with another caption", sorted(n for n in set(now) & set(then)
                                                             if now[n][3] != then[n][3])),
                             ("with another mask", sorted(n for n in set(now) & set(then)
                                                          if now[n][4:] != then[n][4:]))):
            if names:
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                found.append(f"images {label}: {shown}")
        return found


def dataset_fingerprint(items: list[ds.ImageItem]) -> list[list]:
    """Per image: its path inside the dataset folder (`ImageItem.label`), size, modification time and caption (and
    its mask file's)."""
    entries = []
    for item in items:
        files = [item.path] + ([item.mask] if item.mask and item.mask != item.path else [])  # masked loss: its mask
        try:
            stats = [os.stat(f) for f in files]
        except OSError as e:
            raise DatasetError(f"{e.filename} cannot be read since the dataset was checked ({e.strerror}): put it "
                                  "back, or check the dataset again") from None
        entries.append([item.label, stats[0].st_size, stats[0].st_mtime_ns, item.caption])
        for path, st in zip(files[1:], stats[1:]):
            entries[-1] += [item.label_of(path.name), st.st_size, st.st_mtime_ns]
    return sorted(entries)


def model_id(model_hash: str, modules) -> str:
    """The checkpoint's hash when the host gives one; else a hash of every weight's shape and a strided sample
    of its values (a few hundred thousand numbers even for SDXL), which any other checkpoint changes."""
    if model_hash:
        return f"hash:{model_hash}"
    digest = hashlib.sha256()
    for module in modules:
        for name, p in module.state_dict().items():
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            sample = p.detach().flatten()[::4099].to("cpu", torch.float32)
            digest.update(sample.numpy().tobytes())
    return "weights:" + digest.hexdigest()[:32]


def write_state(path: Path, loop: LoopState, record: RunRecord, streams: dict | None = None,
                extra: dict | None = None) -> None:
    """Atomically: a kill during the write leaves the previous state whole."""
    tensors, info = _tensors_and_info(loop, streams)
    info["format"] = FORMAT
    info["total"] = record.settings.steps
    info["run"] = {"settings": record.settings.to_dict(), "family": record.family, "seed": record.seed,
                   "started_at": record.started_at, "model_name": record.model_name, "model_id": record.model_id,
                   "dataset": record.dataset, **(extra or {})}
    header = {HEADER_KEY: json.dumps(info, sort_keys=True)}
    write_atomically(path, safetensors_bytes(tensors, metadata=header), overwrite=True)


def read_state(path: str | Path) -> SavedRun:
    """A state file, or a `.safetensors` of a run whose state lies beside it (see `_state_of_file`)."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return _state_of_file(path)
    if not path.is_file():
        raise LohatrainError(f"there is no saved state {path.name} to resume")
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(HEADER_KEY)
        tensors = load_file(str(path))
        info = json.loads(header) if header else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LohatrainError(f"{path.name} is damaged and cannot be resumed ({e}); start the run again") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LohatrainError(f"{path.name} is not a lohatrain state file this version can resume")
    return SavedRun(path, tensors, info)


def _state_of_file(path: Path) -> SavedRun:
    """The state of the run that wrote `path`. Only the run's latest state is kept, and it is written before each
    file, so any file of the run has it at the file's step or later: the run goes on from the state's step and
    ends in the same file. A state of another run of that name, or older than the file, is refused."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        steps, name = int(meta["ss_steps"]), meta["ss_output_name"]
        file_run = int(meta["ss_training_started_at"]), int(meta["ss_seed"])
    except (SafetensorError, OSError, KeyError, ValueError):
        raise LohatrainError(f"{path.name} is not a file lohatrain wrote, so it has no state to resume") from None
    state_path = path.with_name(name + STATE_SUFFIX)
    saved = read_state(state_path)
    state_run = saved.info["run"]["started_at"], saved.info["run"]["seed"]
    if file_run != state_run:
        raise LohatrainError(f"{path.name} is from another run than {state_path.name} (the file's run started "
                             f"{_when(file_run[0])} with seed {file_run[1]}, the state's {_when(state_run[0])} with "
                             f"seed {state_run[1]}), so it cannot be resumed; start a new run from it (init_from)")
    if saved.step < steps:
        raise LohatrainError(f"{path.name} was saved at step {steps}, but its run's state ({state_path.name}) is "
                             f"older, at step {saved.step}; resume {state_path.name} to go on from step "
                             f"{saved.step}, or start a new run from the file (init_from)")
    saved.note = ((f"{path.name} is from step {steps}; " if saved.step > steps else "")
                  + f"the run continues from its state {state_path.name} at step {saved.step}")
    return saved


def _when(started_at: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started_at))


def list_resumable(folder: str | Path) -> list[dict]:
    """The runs in `folder` that can be resumed (newest first), from the state files' headers only."""
    runs = []
    for path in sorted(Path(folder).glob(f"*{STATE_SUFFIX}")):
        try:
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {})[HEADER_KEY])
            run = info["run"]
            runs.append({"name": path.name[:-len(STATE_SUFFIX)], "step": info["step"], "total": info["total"],
                         "saved_at": path.stat().st_mtime, "model": run["model_name"],
                         "method": run["settings"]["training_method"]})
        except (SafetensorError, OSError, KeyError, ValueError, TypeError):
            continue  # a damaged state is refused with its reason when someone tries to resume it
    return sorted(runs, key=lambda r: -r["saved_at"])
