"""The memory a run needs, known before it starts: the peak on the device it trains on (GPU memory, or host RAM
on a CPU host) and the host RAM beside it, for these settings on the loaded model; and, when that is more than the
card has free, which changes of settings would make it fit.

How (chosen over an exact count): lohatrain's own code runs one caching pass (one image through the VAE) and one
training step (`lohatrain.loop.step`: the batch, the network attached as the trainer attaches it, the model's real
forward and backward under the run's autocast and checkpointing, the loss) on fake tensors: torch's
FakeTensorMode gives every tensor its shape, dtype and device and no memory, so nothing is computed or
allocated. The model's parameters and buffers are stood in for by fakes for that call only
(`torch.func.functional_call`): nothing of the loaded model is copied, loaded or moved. A dispatch mode
(`Tracker`) adds up the bytes of each tensor the pass and the step create while it lives, by device, and keeps
the peak; the same tracker measures a real step (tests/test_memory_estimate.py: on the tiny models the two are
equal). An exact count of the activations would have to follow by hand what every layer keeps (attention
kernels, checkpointing, autocast's casts, the ΔW the network rebuilds in backward); running the code follows
it, and follows the code when it changes.

What exists before the step and is not made by it is counted exactly: the frozen weights at their dtypes on the
device that holds them during training (the trainer moves the VAE and text encoder off the GPU once the cache is
made, unless the run needs them), the network (its fakes have its real sizes), its optimizer state
(`optimizer_state_bytes`: each optimizer's own layout; an 8-bit one cannot run on fakes) and the cached latents,
masks and captions. The step's own part ("activations") includes the network's gradients.

Not counted: CUDA's own context (0.3-0.5 GB outside torch's allocator) and the allocator's fragmentation.
benchmarks/gpu.py prints estimate and measured (`torch.cuda.max_memory_allocated`) side by side; until it has
run on a GPU the estimate is unverified there (docs/speed.md). GB here are 2^30 bytes, as cards are sold.
"""
from __future__ import annotations

import dataclasses
import math
import random
import weakref
from collections import OrderedDict, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import compat, loop, optimizers, trainer
from . import dataset as ds
from .cache import CHUNK_TOKENS, Cache, Sample, encode
from .distributed import ALONE
from .parts import ModelParts
from .preflight import Prepared
from .settings import TrainSettings

GB = 2**30


def optimizer_state_bytes(settings: TrainSettings, params) -> int:
    """The bytes the run's optimizer keeps for its trained tensors `params` once it has stepped, as each package
    lays its state out (torch's AdamW: two moments, a third with amsgrad; bitsandbytes 0.45-0.50 AdamW8bit: one
    byte per moment and a float32 absmax per 256 numbers, full float32 moments for tensors under min_8bit_size;
    prodigyopt: s, p0 (every slice_p-th number), exp_avg_sq, exp_avg unless beta1 is 0; lion-pytorch: exp_avg;
    transformers' Adafactor: the second moment as row and column means for tensors of two or more dimensions,
    exp_avg only with beta1). Step counters and shared tables (a few bytes) are left out. Prodigy's p0 is a
    scalar for a tensor that starts at zero: counted in full, so its figure is at most one copy high."""
    args, _ = optimizers.chosen_args(settings)
    name, total = settings.optimizer, 0
    for p in params:
        n, size = p.numel(), p.element_size()
        if name == "adamw8bit" and n >= args.get("min_8bit_size", 4096):
            total += 2 * (n + 4 * -(-n // 256))
        elif name == "adamw8bit":
            total += 2 * 4 * n
        elif name == "prodigy":
            sliced = -(-n // args.get("slice_p", 1))
            total += (2 * sliced + n * (1 + (args.get("betas", (0.9,))[0] > 0))) * size
        elif name == "lion":
            total += n * size
        elif name == "adafactor":
            shape = p.shape
            second = n if len(shape) < 2 else math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            total += (second + (n if args.get("beta1") is not None else 0)) * size
        else:
            total += (3 if args.get("amsgrad") else 2) * n * size
    return total


# --------------------------------------------------------------------------------------------- the tracker

_DEVICE = torch.ops.prim.device.default
_ITEM = torch.ops.aten._local_scalar_dense.default


class Tracker(TorchDispatchMode):
    """Bytes of the tensors created while it is on that are still alive (each storage once: views and in-place
    results share their input's), by device type, and the peak of each.

    With `fake` (a `compat.fake_mode()` under it), it also makes a step run on fakes: an op that draws from a
    torch.Generator, and any op on such real CPU results, runs for real (the batch order, augmentation draws,
    noise and timesteps are the run's own), and reading a fake's value (`.item()`) gives a stand-in (zero, or
    true)."""

    def __init__(self, fake=None):
        super().__init__()
        self.fake = fake
        self.live: dict[str, int] = defaultdict(int)
        self.peak: dict[str, int] = defaultdict(int)
        self._storages: dict[int, list] = {}  # storage key -> [device type, bytes, ids of the tensors alive on it]

    def reset_peak(self) -> None:
        self.peak = defaultdict(int, self.live)

    def __enter__(self):
        if self.fake is not None:
            compat.forget_fakes(self.fake)
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:
            return func(*args, **kwargs)
        out = self._fake_or_real(func, args, kwargs) if self.fake is not None else func(*args, **kwargs)
        self._track(out, args, kwargs)
        return out

    def _fake_or_real(self, func, args, kwargs):
        from torch._subclasses.fake_tensor import FakeTensor

        leaves = _leaves(args, kwargs)
        if any(isinstance(x, FakeTensor) for x in leaves):
            if func is _ITEM:
                return True if args[0].dtype == torch.bool else 0
        elif _real_cpu_op(leaves, kwargs):
            with torch._C._DisableTorchDispatch():
                return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        finally:
            compat.forget_fakes(self.fake)

    def _track(self, out, args, kwargs) -> None:
        inputs = None
        for t in _leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._storages.get(key)
            if entry is None:
                if inputs is None:
                    inputs = {x.untyped_storage()._cdata for x in _leaves(args, kwargs) if isinstance(x, torch.Tensor)}
                if key in inputs:  # a view or in-place result of a tensor made before
                    continue
                entry = self._storages[key] = [t.device.type, 0, set()]
            device, size = entry[0], storage.nbytes()
            self.live[device] += size - entry[1]  # a storage resized in place counts at its new size
            entry[1] = size
            self.peak[device] = max(self.peak[device], self.live[device])
            if id(t) not in entry[2]:
                entry[2].add(id(t))
                weakref.finalize(t, self._free, key, id(t)).atexit = False

    def _free(self, key: int, tensor_id: int) -> None:
        entry = self._storages[key]
        entry[2].discard(tensor_id)
        if not entry[2]:
            self.live[entry[0]] -= entry[1]
            del self._storages[key]


def _leaves(*trees) -> list:
    leaves, stack = [], list(trees)
    while stack:
        x = stack.pop()
        if isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        else:
            leaves.append(x)
    return leaves


def _real_cpu_op(leaves: list, kwargs: dict) -> bool:
    """An op on real CPU tensors or drawing from a generator, making nothing on another device."""
    return (any(isinstance(x, (torch.Tensor, torch.Generator)) for x in leaves)
            and all(x.device.type == "cpu" for x in leaves if isinstance(x, torch.Tensor))
            and torch.device(kwargs.get("device") or "cpu").type == "cpu")


# -------------------------------------------------------------------------------------------- the estimate

@dataclass(frozen=True)
class FitOptions:
    """What the recipe (`fit`) may use besides the run's own settings: `fp8_setting`, where the user turns on the
    host's FP8 weight storage (None: the host has none that lohatrain trains on); `why_no_8bit(device)`, why the
    8-bit optimizer cannot run there (None: it can); `changeable`, the settings the caller can change (None: all)."""

    fp8_setting: str | None = None
    why_no_8bit: Callable[[torch.device], str | None] = optimizers.why_no_8bit
    changeable: frozenset[str] | None = None


@dataclass
class FitStep:
    """One change of the recipe and what the run needs with it and every change before it. `settings`: the
    settings it changes; empty for the host's own setting `host_setting`, which lohatrain cannot change."""

    label: str
    settings: dict
    need: int
    host_setting: str | None = None


@dataclass
class Fit:
    """The recipe for a card: changes in a fixed order, each kept only where it lowers the need, until the run
    fits (`fits`) or none is left; `need`: what the run needs with all of them; `notes`: changes that would help
    and cannot be made here, and why."""

    steps: list[FitStep]
    need: int
    free: int
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.need <= self.free

    @property
    def settings(self) -> dict:
        """Every step's settings together: what applying the recipe changes."""
        return {k: v for step in self.steps for k, v in step.settings.items()}

    def message(self) -> str:
        listed = ", then ".join(f"{s.label} (≈ {_gb(s.need)})" for s in self.steps)
        if self.fits:
            text = f"To fit: {listed}." if listed else f"It fits: ≈ {_gb(self.need)} of {_gb(self.free)}."
        else:
            text = (f"Even with {listed} it needs ≈ {_gb(self.need)}" if listed else "No change lowers it") + (
                f": no setting lohatrain can change makes it fit {_gb(self.free)}.")
        return " ".join([text, *(f"{note[0].upper()}{note[1:]}." for note in self.notes)])

    def to_dict(self) -> dict:
        return {"message": self.message(), "fits": self.fits, "need_bytes": self.need, "free_bytes": self.free,
                "settings": self.settings, "steps": [dataclasses.asdict(s) for s in self.steps],
                "notes": list(self.notes)}


@dataclass
class Estimate:
    device: str  # where the run trains: "cuda:0", "cpu"
    need: int  # bytes on that device at the run's peak
    parts: dict[str, int]  # what `need` is made of, by name
    host: int  # bytes of host RAM the run's tensors and the model's parts there take at the same time (GPU hosts)
    free: int | None = None  # bytes the run may use on the device; None: unknown (a CPU host)
    phase: str = "training"  # when the peak comes: "training", or "caching" (encoding the images)
    fit: Fit | None = None  # when it does not fit: the changes that would make it (`fit`)

    @property
    def fits(self) -> bool | None:
        return None if self.free is None else self.need <= self.free

    def message(self) -> str:
        """"needs ≈ 6.9 GB of your 8.0 GB free (model 3.4, network + optimizer 0.3, activations 2.9)" (the parts
        that take nothing left out), and, when it does not fit, the changes that would make it."""
        parts = ", ".join(f"{name} {_figure(size)}" for name, size in self.parts.items() if size)
        on_gpu = self.device != "cpu"
        text = (f"needs ≈ {_gb(self.need)} of your {_gb(self.free)} free" if self.free is not None else
                f"needs ≈ {_gb(self.need)} of {'GPU memory' if on_gpu else 'memory'}") + f" ({parts})"
        if self.phase == "caching":
            text += ", most while encoding the images"
        if on_gpu:
            text += f"; CPU memory ≈ {_gb(self.host)}"
        if self.fits is False and self.fit is not None:
            text += ". " + self.fit.message()
        return text

    def to_dict(self) -> dict:
        return {"message": self.message(), "fits": self.fits, "device": self.device, "need_bytes": self.need,
                "free_bytes": self.free, "host_bytes": self.host, "parts_bytes": dict(self.parts),
                "phase": self.phase, "fit": self.fit.to_dict() if self.fit else None}


def _figure(size: int) -> str:
    """GB with one decimal; two below 1 GB (the tiny models)."""
    return f"{size / GB:.1f}" if size >= GB else f"{size / GB:.2f}"


def _gb(size: int) -> str:
    return f"{_figure(size)} GB"


def refusal(est: Estimate, settings: TrainSettings) -> str | None:
    """Why the run must not start (it needs more than the card has free), naming what to change; None to start.
    Only where the free memory is known (a GPU); `ignore_memory_estimate` starts it anyway."""
    if est.fits is not False or settings.ignore_memory_estimate:
        return None
    said = est.message().rstrip(".")
    return (f"This run {said}. As it is, it would run out of GPU memory: change the settings (Fit my card, beside "
            "Train, makes these changes), or start it all the same: tick \"Train even when the memory estimate says it "
            "does not fit\" under Developer options (ignore_memory_estimate in the REST API).")


def available_bytes(parts: ModelParts) -> int | None:
    """What a run on this model may use of its GPU: what is free, what torch's allocator holds unused, and what
    the model's own tensors take there now (the estimate counts them). None on a CPU host."""
    device = _device(parts)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free + unused + sum(_bytes_on(entries, device.type) for entries in _model_tensors(parts).values())


def estimate(parts: ModelParts, settings: TrainSettings, device_free_bytes: int | None = None, *,
             prepared: Prepared | None = None, suggest: bool = True, device: torch.device | None = None,
             options: FitOptions = FitOptions()) -> Estimate:
    """The memory a run of `settings` on `parts` needs (see the module's doc); `device_free_bytes`: what the run may
    use on its device (`available_bytes`), None when unknown. `prepared` (preflight's result) gives the dataset: its
    largest batch and its images and captions; without it, one batch of square images at the resolution.
    `device`: where the run trains, when not where the model is (a model on the CPU or the meta device estimated
    for a GPU: the whole model counted there, as the WebUI holds it before a run). When it does not fit and
    `suggest`: the recipe that would make it fit (`fit`)."""
    est = _estimate(parts, settings, prepared, device=device)
    est.free = device_free_bytes
    if est.fits is False and suggest:
        est.fit = _fit(parts, settings, prepared, device, options, device_free_bytes, est.need)
    return est


@dataclass(frozen=True)
class _Data:
    """What the estimate takes from the dataset: the batch that needs most, the images and captions cached."""

    bucket: tuple[int, int]
    batch: int
    latent_pixels: int  # the latents' pixels summed over the cached images (flipped copies included)
    mask_pixels: int  # the masks' pixels summed (masked loss: one float32 per latent pixel, not flipped)
    image_pixels: int  # the images' pixels summed (kept for colour augmentation)
    captions: list[str]  # the captions a cache encodes

    @classmethod
    def of(cls, settings: TrainSettings, prepared: Prepared | None) -> "_Data":
        items = prepared.items if prepared else []
        buckets = [(settings.resolution,) * 2] * settings.batch_size  # without a dataset: one square batch
        if items:
            buckets = ds.assign_buckets(items, settings.resolution, settings.bucketing, settings.bucket_min_side,
                                        settings.bucket_max_side)
        counts = {b: buckets.count(b) for b in set(buckets)}
        bucket = max(counts, key=lambda b: (min(counts[b], settings.batch_size) * b[0] * b[1], b))
        pixels = sum(w * h for w, h in buckets)
        captions = ds.CaptionVariation.of(settings).cached_captions([i.caption for i in items])
        return cls(bucket, min(counts[bucket], settings.batch_size), (2 if settings.flip_aug else 1) * pixels // 64,
                   pixels // 64 if settings.masked_loss else 0, pixels, sorted(set(captions)) or [""])


def _estimate(parts: ModelParts, settings: TrainSettings, prepared: Prepared | None, fp8: bool = False,
              device: torch.device | None = None) -> Estimate:
    run_on = _run_device(parts)
    device = torch.device(device or run_on)
    data = _Data.of(settings, prepared)
    fp8_tensors = _fp8_tensors(parts) if fp8 else set()
    run = _fake_run(parts, settings, data, run_on, fp8_tensors)
    train_text = settings.text_encoder_lr > 0
    per_step_text = ds.CaptionVariation.of(settings).per_step or train_text
    kept = device.type == torch.device(parts.offload_device).type  # nothing to move the VAE and text encoder to
    model = _model_tensors(parts, fp8_tensors, device if device != _device(parts) else None)
    on_device = {"unet": True, "vae": kept or settings.color_aug, "text_encoder": kept or per_step_text,
                 "other": True}
    weights = sum(_bytes_on(model[name], device.type) for name, stays in on_device.items() if stays)
    moved = sum(_bytes_on(model[name], device.type) for name, stays in on_device.items() if not stays)
    latents = 4 * 4 * data.latent_pixels + 4 * data.mask_pixels
    cond = 0 if per_step_text else run.caption_bytes * len(data.captions)
    pixels = 4 * 3 * data.image_pixels if settings.color_aug else 0
    host_model = sum(_bytes_on(entries, "cpu") for entries in model.values()) if device.type != "cpu" else 0

    training = {"model": weights, "network + optimizer": run.network + run.optimizer, "cached images and captions":
                latents + cond, "activations": run.step[run_on.type]}
    caching = {"model": weights + moved, "network + optimizer": 0, "cached images and captions": latents + cond,
               "activations": run.encoding[run_on.type]}
    phase, peak = max(("training", training), ("caching", caching), key=lambda p: sum(p[1].values()))
    step_on_host = run.step["cpu"] if run_on.type != "cpu" else 0  # on the CPU, the step is the device's part
    host = host_model + (moved if phase == "training" else 0) + pixels + step_on_host
    if device.type == "cpu":
        peak = {**peak, "cached images and captions": peak["cached images and captions"] + pixels}
        host = 0
    return Estimate(str(device), sum(peak.values()), peak, host, phase=phase)


def _device(parts: ModelParts) -> torch.device:
    return next(parts.unet.parameters()).device


def _run_device(parts: ModelParts) -> torch.device:
    """Where the fakes run: the model's device; the CPU for a model on the meta device (built without memory).
    Counted for a GPU, fakes on the CPU hold the same tensors: the run's autocast casts the same ops (its norms
    run in float32 on every device, lohatrain.precision) and SDPA takes a fused kernel there too."""
    model = _device(parts)
    return torch.device("cpu") if model.type == "meta" else model


_Entries = list[tuple[torch.device, int]]  # (device, bytes) of each tensor


def _fp8_tensors(parts: ModelParts) -> set[int]:
    """What the WebUI's FP8 weight option stores in float8 (one byte a number): the weights and biases of every
    Linear and Conv2d outside the VAE (its load_model_weights)."""
    vae = {id(m) for m in parts.vae.modules()} if isinstance(parts.vae, nn.Module) else set()
    layers = (nn.Conv2d, *parts.linear_types)
    return {id(t) for root in (parts.root, parts.unet, parts.text_encoder) if isinstance(root, nn.Module)
            for m in root.modules() if id(m) not in vae and isinstance(m, layers) for t in m.parameters(False)}


def _model_tensors(parts: ModelParts, fp8_tensors: set[int] = frozenset(),
                   on: torch.device | None = None) -> dict[str, _Entries]:
    """The model's tensors by part, each storage once: {part: [(device, bytes)]}; those in `fp8_tensors` at one
    byte a number; all on `on` when given."""
    parts_of = {"unet": parts.unet, "vae": parts.vae, "text_encoder": parts.text_encoder}
    seen, found = set(), {}
    for name, module in [*parts_of.items(), ("other", parts.root)]:
        found[name] = []
        if not isinstance(module, nn.Module):
            continue
        for t in [*module.parameters(), *module.buffers()]:
            key = t.untyped_storage()._cdata
            if key not in seen:
                seen.add(key)
                size = t.numel() if id(t) in fp8_tensors else t.untyped_storage().nbytes()
                found[name].append((on or t.device, size))
    return found


def _bytes_on(entries: _Entries, device_type: str) -> int:
    return sum(size for device, size in entries if device.type == device_type)


# ------------------------------------------------------------------------------- the run on fake tensors

@dataclass
class _Run:
    network: int  # bytes of the network's tensors
    optimizer: int  # bytes of its optimizer's state
    caption_bytes: int  # one cached caption's conditioning
    step: dict[str, int]  # the step's peak by device type
    encoding: dict[str, int]  # one image's caching pass's peak by device type


class _Holder(nn.Module):
    """The model's modules under one module, to stand fakes in for all their tensors in one functional_call."""

    def __init__(self, modules: list[nn.Module], run):
        super().__init__()
        self.held = nn.ModuleList(modules)
        self.run = run

    def forward(self):
        return self.run()


# The last fake runs by what decides them: "Fit my card" and then Train, or a refusal and then Fit my card, estimate
# the same settings again, each a few seconds of CPU on a tiny model and half a minute on SDXL. And the caching
# pass's peak apart, which every change of a recipe but the resolution's leaves as it is. Only numbers are kept.
_RUNS: OrderedDict[tuple, _Run] = OrderedDict()
_ENCODINGS: OrderedDict[tuple, dict] = OrderedDict()
_KEPT = 32


def _remember(memo: OrderedDict, key: tuple, value):
    memo[key] = value
    while len(memo) > _KEPT:
        memo.popitem(last=False)
    return value


def _fake_run(parts: ModelParts, settings: TrainSettings, data: _Data, device: torch.device,
              fp8_tensors: set[int]) -> _Run:
    modules = [m for m in (parts.root, parts.unet, parts.vae, parts.text_encoder) if isinstance(m, nn.Module)]
    inside = {id(sub) for m in modules for sub in list(m.modules())[1:]}
    tops = list({id(m): m for m in modules if id(m) not in inside}.values())
    fake = compat.fake_mode()
    holder = _Holder(tops, None)
    fp8_dtype = getattr(torch, "float8_e4m3fn", None)  # the WebUI's FP8 weight option's dtype
    named = dict([*holder.named_parameters(), *holder.named_buffers()])
    spec = {name: (t.shape, t.stride(), device if t.device.type == "meta" else t.device,
                   fp8_dtype if id(t) in fp8_tensors else t.dtype)
            for name, t in named.items()}
    model = _model_key(parts, holder, spec)
    key = (model, repr(settings), repr(data), str(device))
    if key in _RUNS:
        _RUNS.move_to_end(key)
        return _RUNS[key]
    # the caching pass reads the VAE alone, which the FP8 option leaves as it is
    vae = {id(t) for t in _tensors(parts.vae)}
    vae_spec = {name: entry for name, entry in spec.items() if id(named[name]) in vae}
    encoding_key = (_model_key(parts, parts.vae, vae_spec), data.bucket, settings.train_dtype, settings.deterministic,
                    str(device))
    holder.run = lambda: _run(parts, settings, data, device, fake, _ENCODINGS.get(encoding_key))
    with fake:
        fakes = {name: torch.empty_strided(shape, stride, device=on, dtype=dtype)
                 for name, (shape, stride, on, dtype) in spec.items()}
    with fake:
        run = torch.func.functional_call(holder, fakes, (), tie_weights=False)
    _remember(_ENCODINGS, encoding_key, run.encoding)
    return _remember(_RUNS, key, run)


def _tensors(module) -> list:
    return [*module.parameters(), *module.buffers()] if isinstance(module, nn.Module) else []


def _model_key(parts: ModelParts, modules, spec: dict) -> tuple:
    """What a fake run's figures depend on besides the settings and the data: the model object and its host's
    flags, every tensor's name, shape, stride, device and dtype, the code of each module's forward (the WebUI swaps
    attention forwards when its cross-attention optimization changes) and torch's attention kernels allowed."""
    within = modules.modules() if isinstance(modules, nn.Module) else []
    forwards = {(type(m), getattr(type(m), "forward", None), m.__dict__.get("forward")) for m in within}
    kernels = tuple(getattr(torch.backends.cuda, f)() for f in (
        "flash_sdp_enabled", "mem_efficient_sdp_enabled", "math_sdp_enabled") if hasattr(torch.backends.cuda, f))
    return (id(parts.root), id(parts.unet), parts.family.name, parts.managed, parts.applies_clip_skip,
            tuple((name, tuple(shape), tuple(stride), str(on), str(dtype)) for name, (shape, stride, on, dtype)
                  in spec.items()),
            frozenset((id(c), id(f), id(own)) for c, f, own in forwards), kernels)


def _run(parts: ModelParts, settings: TrainSettings, data: _Data, device: torch.device, fake,
         encoded: dict | None = None) -> _Run:
    """Inside the functional call: the model's tensors are fakes. The run's setup as lohatrain.trainer._train makes
    it (its own functions where it has them; the rest in its order: a change there belongs here too, and
    tests/test_memory_estimate.py fails on one that changes the memory), one image's caching pass (unless
    `encoded` gives its peak) and one training step, each tracked."""
    train_text = settings.text_encoder_lr > 0
    clip_skip = settings.effective_clip_skip if parts.applies_clip_skip else None
    with ExitStack() as stack:
        _, autocast = trainer._hold(stack, parts, settings, train_text, device)
        width, height = data.bucket
        encoding = Tracker(fake)
        if encoded is not None:
            encoding.peak = defaultdict(int, encoded)
        elif parts.vae is not None and not parts.managed:  # a host that moves the parts would load the VAE itself
            pixels = torch.empty(1, 3, height, width)
            with encoding, torch.no_grad(), autocast():
                encode(parts, pixels, device, 0)
        network = trainer._network(parts, settings, 0, train_text, device)
        network.attach()
        stack.callback(network.detach)
        stack.enter_context(parts.unet_training())
        if settings.gradient_checkpointing:
            loop.checkpoint_blocks(parts.unet)
        cond = _conditioning_like(parts, device)
        caption = max(data.captions, key=len)
        sizes = (height, width, 0, 0, height, width)
        latent = torch.empty(1, 4, height // 8, width // 8, device=device)
        mask = torch.empty(1, 1, height // 8, width // 8, device=device) if settings.masked_loss else None
        samples = {i: Sample(ds.ImageItem(Path(f"{i}.png"), caption, width, height), data.bucket,
                             torch.empty(3, height, width) if settings.color_aug else None, latent, latent, sizes,
                             sizes, mask)
                   for i in range(data.batch)}
        per_step_text = ds.CaptionVariation.of(settings).per_step or train_text
        cache = Cache(samples, [caption] * data.batch, {caption: cond}, per_step_text)
        encode_prompts = None
        if per_step_text and parts.managed:  # its text path would load the text encoder: the conditioning stands in
            encode_prompts = lambda captions: _repeat(cond, len(captions))  # noqa: E731
        elif per_step_text:
            encode_prompts = parts.prompt_encoder(clip_skip)
        optimizer = _NoUpdate(trainer.param_groups(network, settings, parts.family))
        state = loop.LoopState(network, optimizer,
                               torch.optim.lr_scheduler.LambdaLR(optimizer, loop.lr_lambda(settings)),
                               compat.grad_scaler(device.type, enabled=False),
                               ds.BucketBatchSampler([data.bucket] * data.batch, data.batch,
                                                     torch.Generator().manual_seed(0)),
                               torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), random.Random(3))
        setup = loop.Setup(parts, loop.Prediction(network, parts.predict), cache, settings, encode_prompts,
                           train_text, loop.training_alphas_cumprod(parts.alphas_cumprod,
                                                                    settings.zero_terminal_snr).to(device),
                           device, autocast, ALONE)
        step = Tracker(fake)
        with step:
            loop.step(setup, state)
        tensors = [*network.parameters(), *network.buffers()]
        return _Run(sum(t.numel() * t.element_size() for t in tensors),
                    optimizer_state_bytes(settings, [p for g in optimizer.param_groups for p in g["params"]]),
                    sum(t.numel() * 4 for t in _leaves(cond)), step.peak, encoding.peak)


class _NoUpdate(torch.optim.Optimizer):
    """The step's optimizer over the run's parameter groups: its state is counted by `optimizer_state_bytes`, and
    an optimizer of another kind (8-bit) cannot run on fakes; its update (in place, a few small temporaries) is
    left out."""

    def __init__(self, groups):
        super().__init__(groups, {"lr": 0.0})

    def step(self, closure=None):
        return None


def _conditioning_like(parts: ModelParts, device: torch.device):
    """One caption's cached conditioning, float32, of the shapes the UNet takes: its cross-attention width
    (SDXL: and the pooled vector its label embedding takes); one 77-token chunk."""
    width = next(m.weight.shape[1] for name, m in parts.unet.named_modules() if name.endswith("attn2.to_k"))
    crossattn = torch.empty(1, CHUNK_TOKENS, width, device=device)
    if parts.family.name != "sdxl":
        return crossattn
    vector = next(m.weight.shape[1] for m in parts.unet.label_emb.modules() if isinstance(m, parts.linear_types))
    return {"crossattn": crossattn, "vector": torch.empty(1, vector, device=device)}


def _repeat(cond, n: int):
    return {k: v.expand(n, *v.shape[1:]) for k, v in cond.items()} if isinstance(cond, dict) else (
        cond.expand(n, *cond.shape[1:]))


# ------------------------------------------------------------------------------------ what would fit

def fit(parts: ModelParts, settings: TrainSettings, free_bytes: int, *, prepared: Prepared | None = None,
        device: torch.device | None = None, options: FitOptions = FitOptions()) -> Fit:
    """The recipe that makes the run fit `free_bytes` ("Fit my card"): the changes that cost the training least
    first, each estimated after those before it, up to the first combination that fits (none when it fits as
    it is). The order: gradient checkpointing; the captions encoded once (the text encoder not trained, no tag
    shuffling or tag dropout), so the text encoder leaves the GPU; no colour augmentation, so the VAE leaves it
    after encoding the images; AdamW's moments in 8 bits (where `options.why_no_8bit` allows); the weights in
    FP8 (the host's own setting, `options.fp8_setting`); the largest batch size that fits, down to 1; the
    largest resolution that fits, down to half. Arguments as `estimate`'s."""
    need = _estimate(parts, settings, prepared, device=device).need
    return _fit(parts, settings, prepared, device, options, free_bytes, need)


def _fit(parts: ModelParts, settings: TrainSettings, prepared: Prepared | None, device: torch.device | None,
         options: FitOptions, free: int, need: int) -> Fit:
    device = torch.device(device or _run_device(parts))
    recipe = Fit([], need, free)
    current, fp8 = settings, False

    def need_with(change: dict, to_fp8: bool = False) -> int:
        return _estimate(parts, dataclasses.replace(current, **change), prepared, fp8 or to_fp8, device).need

    def take(label: str, change: dict, size: int, to_fp8: bool = False, host: str | None = None) -> bool:
        """The step, where it lowers the need; whether the run fits now."""
        nonlocal current, fp8
        if size < recipe.need:
            current, fp8 = dataclasses.replace(current, **change), fp8 or to_fp8
            recipe.steps.append(FitStep(label, change, size, host))
            recipe.need = size
        return recipe.fits

    def allowed(label: str, change: dict) -> bool:
        outside = sorted(set(change) - options.changeable) if options.changeable is not None else []
        if outside:
            recipe.notes.append(f"{label}: {', '.join(outside)} cannot be set here")
        return not outside

    def toggle(label: str, change: dict) -> bool:
        return allowed(label, change) and take(label, change, need_with(change))

    if recipe.fits:
        return recipe
    if (not current.gradient_checkpointing
            and toggle("gradient checkpointing on", {"gradient_checkpointing": True})):
        return recipe
    text = {**({"text_encoder_lr": 0.0} if current.text_encoder_lr > 0 else {}),
            **({"shuffle_tags": False} if current.shuffle_tags else {}),
            **({"caption_tag_dropout_rate": 0.0} if current.caption_tag_dropout_rate > 0 else {})}
    if text and toggle("captions encoded once (" + ", ".join(
            {"text_encoder_lr": "the UNet trained alone", "shuffle_tags": "no tag shuffling",
             "caption_tag_dropout_rate": "no tag dropout"}[k] for k in text) + "), so the text encoder leaves the GPU",
            text):
        return recipe
    if current.color_aug and toggle("color_aug off, so the VAE leaves the GPU once the images are encoded",
                                    {"color_aug": False}):
        return recipe
    if current.optimizer == "adamw":
        why = options.why_no_8bit(device)
        if why:
            recipe.notes.append(f"the 8-bit optimizer (adamw8bit) is left out: {why}")
        elif toggle("the 8-bit optimizer adamw8bit (AdamW's moments in 8 bits)", {"optimizer": "adamw8bit"}):
            return recipe
    if _fp8_possible(parts, current, device):
        if options.fp8_setting is None:
            recipe.notes.append("FP8 storage of the frozen weights (the WebUI's FP8 weight option) is not "
                                "available here")
        elif take(f"the weights stored in FP8 ({options.fp8_setting}: the WebUI's own setting, which lohatrain "
                  "cannot change)", {}, need_with({}, True), True, options.fp8_setting):
            return recipe
    for key, values in (("batch_size", [current.batch_size >> k for k in range(1, current.batch_size.bit_length())]),
                        ("resolution", _lower_resolutions(current.resolution))):
        if values and allowed(key.replace("_", " "), {key: None}):
            for value in values:
                change = {key: value} if key == "batch_size" else {key: value, **_buckets_for(current, value)}
                size = need_with(change)
                if size <= free or value == values[-1]:
                    if take(f"{key.replace('_', ' ')} {value}", change, size):
                        return recipe
                    break
    return recipe


def _fp8_possible(parts: ModelParts, settings: TrainSettings, device: torch.device) -> bool:
    """FP8 storage of the frozen weights: on a GPU, training in half precision, a torch with float8 dtypes, the
    model not already so held."""
    return bool(compat.FP8_DTYPES) and device.type == "cuda" and settings.train_dtype != "fp32" and not (
        {p.dtype for p in parts.unet.parameters()} & compat.FP8_DTYPES)


def _lower_resolutions(resolution: int) -> list[int]:
    """Down to half the resolution in four steps of 64 px multiples, largest first."""
    lower = {resolution * eighths // 8 // 64 * 64 for eighths in (7, 6, 5, 4)}
    return sorted((r for r in lower if 64 <= r < resolution), reverse=True)


def _buckets_for(settings: TrainSettings, resolution: int) -> dict:
    """The bucket sides that go with a lower resolution (they may not exceed it)."""
    return {"bucket_min_side": min(settings.bucket_min_side, resolution),
            "bucket_max_side": max(min(settings.bucket_max_side, resolution * 2), resolution)}
