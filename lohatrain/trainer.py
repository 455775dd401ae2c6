"""Training, as the tab, the REST API, the command line and the tests run it: `train(parts, settings, hooks)`.

Stages: preflight (lohatrain.preflight: once per run, its result handed in by a caller that already has it) → the
cache (lohatrain.cache: latents through the VAE, conditioning through the host's text path) → VAE and text encoder
off the GPU → the network attached → the loop (lohatrain.loop: a `LoopState` advanced step by step) → every file
written (lohatrain.saves) → network detached → the model as found (ModelGuard). A resumed run restores the
LoopState (lohatrain.run_state) and runs the same loop.
"""
from __future__ import annotations

import dataclasses
import os
import random
import secrets
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from . import compat, loop, optimizers, run_state
from . import dataset as ds
from .cache import Cache, cache_conditioning, cache_latents
from .distributed import ALONE, Ranks
from .errors import LohatrainError
from .model_guard import ModelGuard
from .network import Network, plan_text_encoder, plan_unet
from .output import timestamp
from .parts import ModelParts
from .precision import COMPUTE_DTYPES, route_low_precision_layers
from .preflight import Prepared, preflight
from .run_state import RunRecord, SavedRun
from .saves import Saves
from .settings import TrainSettings
from .targets import block_weights


@dataclass
class Progress:
    """What a progress bar shows. `stage` is a short phrase for the phases before and after the steps."""

    stage: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    smooth_loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None


@dataclass
class Hooks:
    """How the caller follows and steers a run; each may be left out."""

    progress: Callable[[Progress], None] | None = None  # stages, then every step's figures
    stop: Callable[[], bool] | None = None  # polled every step: true stops the run within one step, saving it
    on_step: Callable[[int, Network], None] | None = None  # after each step, the network attached (previews)
    load_unet: Callable[[], None] | None = None  # a host that moves the parts itself puts the whole UNet on its
    # device (before the first step and after every on_step); the trainer then moves no part itself


@dataclass
class TrainResult:
    status: str  # "done" or "interrupted"
    file: Path | None
    steps_done: int
    seed: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    activation_text: str = ""  # the trigger words the WebUI's card for the file holds


def train(parts: ModelParts, settings: TrainSettings, hooks: Hooks | None = None, *,
          prepared: Prepared | None = None, resume: SavedRun | None = None, resume_anyway: bool = False,
          ranks: Ranks = ALONE) -> TrainResult:
    """Train a network of settings.training_method on the model `parts` describe, into `settings.output_dir`; the
    model is left exactly as found, whatever happens.

    `prepared`: preflight's result for these parts and settings, when the caller already has it. `resume`
    (lohatrain.run_state.read_state) goes on from a saved state with the run's own settings (only `output_dir`,
    `steps` and `keep_state` may differ): the same loop, from the saved step. A changed dataset or model is refused
    unless `resume_anyway` (the file's metadata then says what changed). `ranks` (lohatrain.distributed): this
    process's place in a data-parallel run, where every process trains the same model and settings; only rank 0
    reports progress, calls `on_step` and writes files.
    """
    try:
        return _train(parts, prepared or preflight(parts, settings, resuming=resume is not None), hooks or Hooks(),
                      resume, resume_anyway, ranks)
    except compat.OutOfMemoryError:
        raise LohatrainError(
            "Training ran out of GPU memory. Lower the batch size or the resolution, turn on gradient "
            "checkpointing, or choose a smaller network preset. The model was left as it was.") from None


def _train(parts: ModelParts, prepared: Prepared, hooks: Hooks, resume: SavedRun | None, resume_anyway: bool,
           ranks: Ranks) -> TrainResult:
    settings, items = prepared.settings, prepared.items
    ranks.check_batch_size(settings.batch_size)
    started = time.perf_counter()
    report = hooks.progress if hooks.progress and ranks.main else (lambda p: None)
    on_step = hooks.on_step if ranks.main else None
    stop = hooks.stop or (lambda: False)
    load_unet = hooks.load_unet or (lambda: None)
    record, changes = _record(parts, prepared, resume, resume_anyway)
    seed, device = record.seed, next(parts.unet.parameters()).device
    bucket_of = ds.assign_buckets(items, settings.resolution, settings.bucketing, settings.bucket_min_side,
                                  settings.bucket_max_side)
    warnings = ds.upscale_warnings(items, bucket_of)
    train_text = settings.text_encoder_lr > 0
    clip_skip = settings.effective_clip_skip if parts.applies_clip_skip else None
    encode_prompts = parts.prompt_encoder(clip_skip)

    with ExitStack() as stack:
        guard, autocast = _hold(stack, parts, settings, train_text, device)
        draws = ds.draws_per_epoch(items)
        batch_sampler = ds.BucketBatchSampler(bucket_of, settings.batch_size, torch.Generator().manual_seed(seed),
                                              draws)
        if resume:
            batch_sampler.load_state_dict(resume.sampler_state)
        needed = {i for i in ranks.images_needed(batch_sampler, settings.steps - (resume.step if resume else 0),
                                                 len(items)) if draws[i]}  # regularization images left out: none
        cache = _cache(parts, prepared, bucket_of, needed, encode_prompts, train_text, autocast, stop, seed, report)
        if cache is None:
            return TrainResult("interrupted", None, 0, seed, time.perf_counter() - started, warnings=warnings)

        def ready_unet() -> None:
            """The UNet whole on its device, with ordinary weights (a host's moves may make them inference
            tensors again)."""
            load_unet()
            guard.make_ordinary(parts.unet)
            if train_text:
                guard.make_ordinary(parts.text_encoder)

        ready_unet()
        network = _network(parts, settings, seed, train_text, device)
        network.attach()
        stack.callback(network.detach)
        stack.enter_context(parts.unet_training())
        if settings.gradient_checkpointing:
            loop.checkpoint_blocks(parts.unet)
        state = _loop_state(network, settings, seed, batch_sampler, device, parts.family)
        if resume:
            run_state.restore(state, resume)
        elif settings.init_from:
            _start_from_file(network, prepared.plan.folder / settings.init_from)
        setup = loop.Setup(parts, ranks.parallel(loop.Prediction(network, parts.predict)), cache, settings,
                           encode_prompts, train_text,
                           loop.training_alphas_cumprod(parts.alphas_cumprod, settings.zero_terminal_snr).to(device),
                           device, autocast, ranks, ds.loss_weights(items, settings.prior_loss_weight))
        saves = Saves(prepared, parts, record, state, clip_skip, bucket_of, ranks.world_size, changes,
                      resumed=resume is not None)
        first_step, rate = state.step, loop.Rate(state.step)
        whole_step_streams = state.streams()  # the streams as they were after the last whole step

        def after_step(step: int) -> None:
            nonlocal whole_step_streams
            whole_step_streams = state.streams()
            report(Progress("Training", step, settings.steps, state.losses[-1], state.smooth,
                            optimizers.current_lr(state.optimizer, _unet_lr(state)),
                            *rate.at(step, settings.steps)))
            if on_step:
                with torch.no_grad():
                    on_step(step, network)
                ready_unet()
            if ranks.main:
                saves.periodic(step)

        try:
            status = loop.run(setup, state, stop, after_step)
            final, metadata, activation_text = None, {}, _activation_text(settings, items)
            if state.step > 0 and ranks.main:
                report(Progress("Saving", state.step, settings.steps))
                final, metadata = saves.final(status, activation_text)
            ranks.barrier()  # every process ends once rank 0 has written
        except (Exception, KeyboardInterrupt) as failure:
            # Keep what was trained up to the last whole step, resumable, unless the weights are the problem.
            if state.step > first_step and not isinstance(failure, loop.Diverged) and ranks.main:
                saves.after_failure(whole_step_streams)
            raise
    return TrainResult(status, final, state.step, seed, time.perf_counter() - started, state.losses, saves.files,
                       warnings, metadata, activation_text if final else "")


def _record(parts: ModelParts, prepared: Prepared, resume: SavedRun | None,
            anyway: bool) -> tuple[RunRecord, list[str]]:
    """What the run is made from (its seed, model and dataset), and for a resume what changed since (refused unless
    `anyway`)."""
    settings = prepared.settings
    record = RunRecord(settings, parts.family.name, settings.seed if settings.seed >= 0 else secrets.randbelow(2**32),
                       timestamp(), parts.name,
                       run_state.model_id(parts.hash, [parts.unet, parts.text_encoder, parts.vae]),
                       run_state.dataset_fingerprint(prepared.items))
    if not resume:
        return record, []
    changes = _check_resume(resume, settings, record, anyway)
    return dataclasses.replace(record, seed=resume.record.seed, started_at=resume.record.started_at), changes


def _hold(stack: ExitStack, parts: ModelParts, settings: TrainSettings, train_text: bool, device):
    """The model as the run needs it, each change undone when `stack` closes: every part guarded (a host that moves
    parts itself keeps its VAE and text encoders: only the UNet is the trainer's), frozen, low-precision layers
    routed, the text path ready for gradients; and the autocast the run computes under."""
    compute_dtype = COMPUTE_DTYPES[settings.train_dtype]
    trained = [parts.unet] if parts.managed else [parts.unet, parts.vae, parts.text_encoder]
    guard = stack.enter_context(ModelGuard(*([] if parts.managed else [parts.root]), *trained))
    stack.enter_context(_determinism(settings.deterministic and device.type == "cuda"))
    guard.disable_ldm_checkpointing()
    for root in guard.roots:
        for p in root.parameters():
            p.requires_grad_(False)
    route_low_precision_layers(trained, compute_dtype)
    if train_text:
        stack.enter_context(parts.text_training())
    # torch 2.1 rejects a CPU autocast dtype other than bf16 even when disabled: no autocast at all for fp32
    autocast = (partial(torch.autocast, device.type, dtype=compute_dtype) if compute_dtype != torch.float32
                else nullcontext)
    return guard, autocast


def _cache(parts: ModelParts, prepared: Prepared, bucket_of, needed: set[int], encode_prompts, train_text: bool,
           autocast, stop, seed: int, report) -> Cache | None:
    """The latents and (unless encoded every step) the captions' conditioning; then the VAE and text encoder off the
    GPU, unless the host moves them itself. None when stopped meanwhile."""
    settings = prepared.settings
    report(Progress("Encoding images"))
    device = next(parts.unet.parameters()).device
    samples = cache_latents(parts, prepared.items, bucket_of, needed, settings, device, autocast, stop, seed)
    if samples is None:
        return None
    if not settings.color_aug and not parts.managed:
        parts.vae.to(parts.offload_device)
    captions = [item.caption for item in prepared.items]
    variation = ds.CaptionVariation.of(settings)
    cache = Cache(samples, captions, {}, per_step_text=variation.per_step or train_text)
    if not cache.per_step_text:
        report(Progress("Encoding captions"))
        cache.conditioning = cache_conditioning(encode_prompts, variation.cached_captions(captions), autocast)
        if not parts.managed:
            parts.text_encoder.to(parts.offload_device)
    return cache


def _network(parts: ModelParts, settings: TrainSettings, seed: int, train_text: bool, device) -> Network:
    plans = plan_unet(parts.family, parts.unet, settings.dim, settings.alpha, settings.conv_dim, settings.conv_alpha,
                      parts.linear_types, settings.network_targets)
    if train_text:
        plans += plan_text_encoder(parts, settings.dim, settings.alpha, settings.network_targets)
    return Network(plans, seed, settings.training_method, settings.lokr_factor, settings.dora).to(device)


def param_groups(network: Network, settings: TrainSettings, family) -> list[dict]:
    """The optimizer's parameter groups: the UNet's at its learning rate, or with kohya's block weights one group per
    block at the rate times its weight (`lr_weight`; a block of weight 0 is left out and frozen, as kohya leaves it
    out); then the text encoder's."""
    weights = block_weights(settings, family.lr_blocks)
    if weights is None:
        groups = [{"params": network.parameters_of(text_encoder=False), "lr": settings.learning_rate}]
    else:
        groups = []
        for block, params in network.parameters_by_block().items():
            weight = weights.get(block, 1.0)
            if weight == 0:
                for p in params:
                    p.requires_grad_(False)
            else:
                groups.append({"params": params, "lr": settings.learning_rate * weight, "lr_weight": weight})
    if settings.text_encoder_lr > 0:
        groups.append({"params": network.parameters_of(text_encoder=True), "lr": settings.text_encoder_lr})
    return groups


def _loop_state(network: Network, settings: TrainSettings, seed: int, batch_sampler, device,
                family) -> loop.LoopState:
    optimizer = optimizers.build(settings, param_groups(network, settings, family), device)
    return loop.LoopState(network, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, loop.lr_lambda(settings)),
                          compat.grad_scaler(device.type, enabled=settings.train_dtype == "fp16"), batch_sampler,
                          torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2),
                          random.Random(seed + 3))


def _unet_lr(state: loop.LoopState) -> float:
    """The UNet's learning rate now (the first group's, without its block weight)."""
    return state.scheduler.get_last_lr()[0] / state.optimizer.param_groups[0].get("lr_weight", 1.0)


def _check_resume(resume: SavedRun, settings: TrainSettings, now: RunRecord, anyway: bool) -> list[str]:
    """Refuse a resume whose settings differ from the run's own, or (unless `anyway`) whose model or dataset
    changed; return the changes that were accepted."""
    free = {"output_dir", "steps", "keep_state"}
    saved = resume.record.settings.to_dict()
    differ = sorted(k for k, v in settings.to_dict().items() if k not in free and saved.get(k) != v)
    if differ:
        raise LohatrainError(f"a resumed run keeps its own settings; these differ from {resume.path.name}'s: "
                             f"{', '.join(differ)}")
    if settings.steps <= resume.step:
        raise LohatrainError(f"{resume.path.name} is at step {resume.step}: give more steps than that to go on")
    changes = resume.changes(now.model_id, now.dataset)
    if changes and not anyway:
        raise LohatrainError(f"cannot resume {settings.name} exactly: " + "; ".join(changes) + ". Put things back "
                             "as they were, or resume anyway (the result then differs from an uninterrupted "
                             "run, and its metadata says so).")
    return changes


def _start_from_file(network: Network, path: Path) -> None:
    if not path.is_file():
        raise LohatrainError(f"init_from: there is no {path.name} in the output folder")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise LohatrainError(f"init_from: {path.name} cannot be read ({e})") from None
    network.load_file_tensors(tensors, path.name)


def _activation_text(settings: TrainSettings, items) -> str:
    """The trigger the WebUI's card puts in a prompt: the phrase, else the first tag most captions start with, one
    per `N_name` sub-folder (each concept its own); regularization images have none."""
    if settings.caption_mode == "phrase":
        return settings.caption_phrase
    triggers = []
    for folder in dict.fromkeys(i.folder for i in items if not i.regularization):
        first_tags = [i.caption.split(",")[0].strip() for i in items
                      if i.folder == folder and not i.regularization and i.caption.strip()]
        if first_tags:
            triggers.append(max(sorted(set(first_tags)), key=first_tags.count))
    return ", ".join(dict.fromkeys(triggers))


@contextmanager
def _determinism(enabled: bool):
    """torch's deterministic algorithms on the GPU for the run only (CPU runs are deterministic anyway); the
    cuBLAS workspace variable they need is put back as it was afterwards."""
    if not enabled:
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]
        if saved_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
