"""The training loop: one function, `train`, that the tab, the REST API, the command line and tests call.

Flow: settings → dataset (images, captions, buckets) → cache (`_Cache`: latents through the VAE, conditioning
through the model's own text path) → VAE / text encoder off the GPU → network attached → loop (`_step` advances
a `LoopState`: what is saved to resume, lohatrain/run_state.py) → network detached → model restored exactly
(ModelGuard) → file written atomically. A resumed run restores the LoopState and runs the same loop.
"""
from __future__ import annotations

import dataclasses
import logging
import math
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
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import compat, run_state
from . import dataset as ds
from .distributed import ALONE, Ranks
from .errors import LohatrainError
from .model_guard import ModelGuard
from .network import Network, plan_text_encoder, plan_unet
from .precision import COMPUTE_DTYPES, route_low_precision_layers
from .preflight import preflight
from .rng import seeded_global_rng
from .output import SAVE_DTYPES, build_metadata, save_network, timestamp, write_sidecars
from .run_state import LoopState, RunRecord, SavedRun
from .settings import TrainSettings

log = logging.getLogger("lohatrain")



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


@dataclass
class _Sample:
    """One training image, ready for the loop: cached latents (plain and flipped) and caption."""

    item: ds.ImageItem
    bucket: tuple[int, int]
    pixels: torch.Tensor | None  # kept only when colour augmentation re-encodes every step
    latent: torch.Tensor
    latent_flipped: torch.Tensor | None
    sizes: tuple[int, ...]  # original (h, w), crop (top, left), target (h, w): SDXL's size conditioning
    sizes_flipped: tuple[int, ...]  # the same with the crop measured in the mirrored image


@dataclass
class _Cache:
    """The dataset as the loop reads it: the latents of every image this process trains on (by image index),
    every image's caption, and every caption's conditioning unless the text encoder runs each step (shuffled
    tags, or trained)."""

    samples: dict[int, _Sample]
    captions: list[str]
    conditioning: dict[str, object]
    per_step_text: bool


def train(model, settings: TrainSettings, *, output_dir: str | Path | None = None,
          encode_prompts: Callable[[list[str]], object] | None = None, model_name: str = "unknown",
          model_hash: str = "", on_progress: Callable[[Progress], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          on_step: Callable[[int, Network], None] | None = None,
          offload_device: str | torch.device = "cpu", resume: SavedRun | None = None,
          resume_anyway: bool = False, clip_skip_applies: bool | None = None, ranks: Ranks = ALONE,
          load_unet: Callable[[], None] | None = None) -> TrainResult:
    """Train a LoRA-type network (settings.training_method) on `model` (an ldm LatentDiffusion-like object) and write it to `output_dir`.

    `encode_prompts` replaces the model's own `get_learned_conditioning` (the WebUI passes its own, with
    its CLIP-skip option and without prompt-emphasis parsing). `should_stop` is polled every step: when it
    turns true the run stops within one step and saves what it has. `on_step(step, network)` runs after each
    step with the network attached (previews). The model is left exactly as found, whatever happens.

    `resume` (lohatrain.run_state.read_state) goes on from a saved state with the run's own settings (only
    `output_dir`, `steps` and `keep_state` may differ): the same loop, from the saved step. A changed dataset or
    model is refused unless `resume_anyway` (the file's metadata then says what changed).

    `clip_skip_applies` says whether `encode_prompts` applies the run's CLIP skip, so the file records it (by
    default the family's rule: SD1 yes; SD2 and SDXL no, unless the WebUI's "Clip skip SDXL" option is on).

    `ranks` (lohatrain.distributed.join_torchrun): this process's place in a data-parallel run, where every
    process calls `train` with the same model and settings; only rank 0 reports progress, calls `on_step` and
    writes files.

    `load_unet`, for a host whose memory manager moves the model's parts by itself (Forge: `family.host_managed`),
    has it put the whole UNet on its device; it runs before the first step and after every `on_step`, and the
    trainer then moves no part itself.
    """
    try:
        return _train(model, settings, output_dir, encode_prompts, model_name, model_hash, on_progress,
                      should_stop, on_step, offload_device, resume, resume_anyway, clip_skip_applies, ranks,
                      load_unet)
    except compat.OutOfMemoryError:
        raise LohatrainError(
            "Training ran out of GPU memory. Lower the batch size or the resolution, turn on gradient "
            "checkpointing, or choose a smaller network preset. The model was left as it was.") from None


def _train(model, settings, output_dir, encode_prompts, model_name, model_hash, on_progress, should_stop,
           on_step, offload_device, resume, resume_anyway, clip_skip_applies, ranks, load_unet) -> TrainResult:
    checked = preflight(model, settings, output_dir or settings.output_dir or ".", resuming=resume is not None)
    ranks.check_batch_size(settings.batch_size)
    family, plan, items = checked.family, checked.plan, checked.items
    started = time.perf_counter()
    report = on_progress if on_progress and ranks.main else (lambda p: None)
    on_step = on_step if ranks.main else None
    stop = should_stop or (lambda: False)
    v_prediction = family.v_prediction(model)
    unet = family.unet(model)
    vae = family.vae(model)
    text_encoder = family.text_encoder(model)
    device = next(unet.parameters()).device
    compute_dtype = COMPUTE_DTYPES[settings.train_dtype]
    record = RunRecord(settings, family.name, settings.seed if settings.seed >= 0 else secrets.randbelow(2**32),
                       timestamp(), model_name, run_state.model_id(model_hash, [unet, text_encoder, vae]),
                       run_state.dataset_fingerprint(items))
    changes = _check_resume(resume, settings, record, resume_anyway) if resume else []
    if resume:
        record = dataclasses.replace(record, seed=resume.record.seed, started_at=resume.record.started_at)
    seed, started_at = record.seed, record.started_at

    bucket_of = ds.assign_buckets(items, settings.resolution, settings.bucketing, settings.bucket_min_side,
                                  settings.bucket_max_side)
    warnings = ds.upscale_warnings(items, bucket_of)
    train_text = settings.text_encoder_lr > 0
    applies = family.applies_clip_skip if clip_skip_applies is None else clip_skip_applies
    clip_skip = settings.effective_clip_skip if applies else None

    # A host that moves parts itself keeps the VAE and text encoders: only the UNet is the trainer's to touch.
    managed = family.host_managed
    guarded = [unet] if managed else [model, unet, vae, text_encoder]
    load_unet = load_unet or (lambda: None)
    with ExitStack() as stack:
        guard = stack.enter_context(ModelGuard(*guarded))
        stack.enter_context(_determinism(settings.deterministic and device.type == "cuda"))
        guard.disable_ldm_checkpointing()
        for root in guard.roots:
            for p in root.parameters():
                p.requires_grad_(False)
        route_low_precision_layers(guarded if managed else guarded[1:], compute_dtype)
        if encode_prompts is None:
            stack.enter_context(family.clip_skip(model, clip_skip))
            encode_prompts = family.prompt_encoder(model)
        if train_text:
            stack.enter_context(family.text_training(model))
        # torch 2.1 rejects a CPU autocast dtype other than bf16 even when disabled: no autocast at all for fp32
        autocast = (partial(torch.autocast, device.type, dtype=compute_dtype) if compute_dtype != torch.float32
                    else nullcontext)

        batch_sampler = ds.BucketBatchSampler(bucket_of, settings.batch_size, torch.Generator().manual_seed(seed))
        if resume:
            batch_sampler.load_state_dict(resume.sampler_state)
        needed = ranks.images_needed(batch_sampler, settings.steps - (resume.step if resume else 0), len(items))
        report(Progress("Encoding images"))
        samples = _cache_latents(model, family, items, bucket_of, needed, settings, device, autocast, stop, seed)
        if samples is None:
            return TrainResult("interrupted", None, 0, seed, time.perf_counter() - started, warnings=warnings)
        if not settings.color_aug and not managed:
            vae.to(offload_device)
        captions = [item.caption for item in items]
        cache = _Cache(samples, captions, {}, per_step_text=settings.shuffle_tags or train_text)
        if not cache.per_step_text:
            report(Progress("Encoding captions"))
            cache.conditioning = _cache_conditioning(encode_prompts, captions, autocast)
            if not managed:
                text_encoder.to(offload_device)

        def ready_unet() -> None:
            """The UNet whole on its device, with ordinary weights (a host's moves may make them inference
            tensors again)."""
            load_unet()
            guard.make_ordinary(unet)
            if train_text:
                guard.make_ordinary(text_encoder)

        ready_unet()

        unet_plans = plan_unet(family, unet, settings.dim, settings.alpha, settings.conv_dim, settings.conv_alpha)
        text_plans = plan_text_encoder(family, text_encoder, settings.dim, settings.alpha) if train_text else []
        network = Network(unet_plans + text_plans, seed, settings.training_method, settings.lokr_factor,
                          settings.dora).to(device)
        network.attach()
        stack.callback(network.detach)
        stack.enter_context(family.unet_training(unet))
        if settings.gradient_checkpointing:
            _checkpoint_blocks(unet)

        groups = [{"params": network.parameters_of(text_encoder=False), "lr": settings.learning_rate}]
        if train_text:
            groups.append({"params": network.parameters_of(text_encoder=True), "lr": settings.text_encoder_lr})
        # The fused kernel updates all trainable tensors at once: the per-tensor loop was ~8% of a step.
        optimizer = torch.optim.AdamW(groups, weight_decay=0.01, fused=compat.fused_adamw_supported(device.type))
        loop = LoopState(network, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings)),
                         compat.grad_scaler(device.type, enabled=compute_dtype == torch.float16), batch_sampler,
                         torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 2),
                         random.Random(seed + 3))
        if resume:
            loop.restore(resume)
        elif settings.init_from:
            _start_from_file(network, plan.folder / settings.init_from)
        predict = ranks.parallel(_Prediction(network, partial(family.predict, model)))
        alphas_cumprod = training_alphas_cumprod(family.alphas_cumprod(model), settings.zero_terminal_snr).to(device)

        save_dtype = SAVE_DTYPES[settings.save_dtype]
        tag_frequency, bucket_counts = ds.tag_frequency(items), dict(ds.bucket_table(items, bucket_of))

        def make_metadata(steps_done: int) -> dict[str, str]:
            return build_metadata(
                settings, family_metadata=family.metadata(model), model_name=model_name, model_hash=model_hash,
                clip_skip=clip_skip, image_count=len(items), tag_frequency=tag_frequency,
                bucket_counts=bucket_counts, steps_done=steps_done, started_at=started_at,
                batches_per_epoch=batch_sampler.batches_per_epoch, seed=seed, processes=ranks.world_size,
                extra=extra_metadata)

        extra_metadata = {"lohatrain_resumed_with_changes": "; ".join(changes)} if changes else {}
        save_state = partial(run_state.write_state, plan.state_file, loop, record,
                             extra={"resumed_with_changes": changes} if changes else None)
        files: list[Path] = []
        first_step = loop.step
        loop_start = time.perf_counter()
        status = "done"
        whole_step_streams = loop.streams()  # the streams as they were after the last whole step
        try:
            while loop.step < settings.steps:
                if ranks.any(stop()):
                    status = "interrupted"
                    break
                _step(model, family, predict, cache, settings, loop, encode_prompts, train_text, alphas_cumprod,
                      v_prediction, device, autocast, ranks)
                whole_step_streams = loop.streams()
                step = loop.step
                elapsed = time.perf_counter() - loop_start
                rate = (step - first_step) / elapsed if elapsed > 0 else None
                report(Progress("Training", step, settings.steps, loop.losses[-1], loop.smooth,
                                loop.scheduler.get_last_lr()[0], rate, (settings.steps - step) / rate if rate else None))
                if on_step:
                    with torch.no_grad():
                        on_step(step, network)
                    ready_unet()
                if (settings.save_every_steps and step % settings.save_every_steps == 0 and step < settings.steps
                        and ranks.main):
                    save_state()  # before the file: every file on disk has its run's state at its step or later
                    files.append(save_network(plan.intermediate(step), network.file_tensors(save_dtype),
                                              make_metadata(step), overwrite=settings.overwrite or resume is not None))

            step = loop.step
            final, metadata = None, {}
            activation_text = _activation_text(settings, items)
            if step > 0 and ranks.main:
                report(Progress("Saving", step, settings.steps))
                metadata = make_metadata(step)
                keep_state = status == "interrupted" or settings.keep_state
                if keep_state:
                    save_state()  # before the file, as for every save
                final = save_network(plan.final, network.file_tensors(save_dtype), metadata,
                                     overwrite=settings.overwrite or resume is not None)
                files.append(final)
                write_sidecars(plan, settings, seed, activation_text=activation_text,
                               notes=f"Trained with lohatrain on {model_name}, {step} steps, seed {seed}.",
                               sd_version=family.card_version)
                if not keep_state:
                    plan.state_file.unlink(missing_ok=True)
            ranks.barrier()  # every process ends once rank 0 has written
        except (Exception, KeyboardInterrupt) as failure:
            # Keep what was trained up to the last whole step, resumable, unless the weights are the problem.
            if loop.step > first_step and not isinstance(failure, _Diverged) and ranks.main:
                _save_after_failure(save_state, whole_step_streams)
            raise
    return TrainResult(status, final, step, seed, time.perf_counter() - started, loop.losses, files, warnings,
                       metadata, activation_text if final else "")


class _Diverged(LohatrainError):
    """The loss is not finite: the weights are broken, so no state is saved from them."""


def _step(model, family, predict, cache: _Cache, settings, loop: LoopState, encode_prompts, train_text,
          alphas_cumprod, v_prediction, device, autocast, ranks: Ranks) -> None:
    """One optimisation step: a batch, its noise and timesteps, the loss, the update; it advances `loop`.

    Every process draws the whole batch's random numbers from the same streams and trains its share of the
    images (`ranks.share`), so each image gets what it gets in a one-process run."""
    indexes = loop.sampler.next_batch()
    share = ranks.share(len(indexes))
    augmentations = [_Augmentation.draw(settings, loop.aug_gen) for _ in indexes]
    latents, sizes = _batch_latents(model, family, [cache.samples[i] for i in indexes[share]],
                                    augmentations[share], settings, device, autocast)
    captions = [cache.captions[i] for i in indexes]
    if settings.shuffle_tags:
        captions = [ds.shuffle_caption(c, loop.caption_rng, settings.keep_tokens) for c in captions]
    # The whole batch's captions are encoded or stacked, then cut to the share: a batch pads every caption to
    # its longest, as in a one-process run.
    if cache.per_step_text:
        with torch.set_grad_enabled(train_text), autocast():
            cond = encode_prompts(captions)
    else:
        cond = family.stack_conditioning([cache.conditioning[c] for c in captions], cache.conditioning.get(""))
    cond = family.condition_on_images(model, _rows(cond, share), sizes)

    noise_gen = loop.noise_gen
    shape = (len(indexes), *latents.shape[1:])
    noise = torch.randn(shape, generator=noise_gen)[share].to(device)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn(shape[:2] + (1, 1), generator=noise_gen)[share].to(device)
    timesteps = torch.randint(0, len(alphas_cumprod), (len(indexes),), generator=noise_gen)[share].to(device)
    ac = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    target = ac.sqrt() * noise - (1 - ac).sqrt() * latents if v_prediction else noise

    with autocast():
        prediction = predict(noisy, timesteps, cond)
    loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if settings.min_snr_gamma:
        snr = ac.flatten() / (1 - ac.flatten())
        weight = snr.clamp(max=settings.min_snr_gamma) / (snr + 1 if v_prediction else snr)
        loss = loss * weight
    loss = loss.mean()  # over the share: the processes' average gradient is the whole batch's
    batch_loss = ranks.mean(loss)  # before the update: a process lost here leaves the weights of the last step
    loop.scaler.scale(loss).backward()
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.step += 1

    value = batch_loss.item()
    if not math.isfinite(value):
        raise _Diverged(f"training diverged at step {loop.step} (loss is {value}): lower the learning rate, or "
                        "use bf16 or fp32 instead of fp16")
    loop.losses.append(value)
    loop.smooth = value if loop.smooth is None else 0.9 * loop.smooth + 0.1 * value


class _Prediction(nn.Module):
    """The model's prediction as a module that holds the network and not the model: DistributedDataParallel
    averages the gradients of a module's parameters when its forward has run, and the network works hooked
    into the model's own layers; the model's frozen weights stay outside, so nothing syncs them."""

    def __init__(self, network: Network, predict: Callable):
        super().__init__()
        self.network = network
        self.predict = predict

    def forward(self, noisy, timesteps, cond):
        return self.predict(noisy, timesteps, cond)


@dataclass
class _Augmentation:
    """What is drawn for one image of a batch: a mirror flip, and a colour change with its VAE sample's seed."""

    flip: bool
    color: tuple[float, float, float] | None
    vae_seed: int | None

    @staticmethod
    def draw(settings, gen: torch.Generator) -> "_Augmentation":
        flip = settings.flip_aug and torch.rand((), generator=gen).item() < 0.5
        if not settings.color_aug:
            return _Augmentation(flip, None, None)
        color = ds.color_change(gen)
        return _Augmentation(flip, color, int(torch.randint(2**31, (), generator=gen)))


def _rows(cond, rows: slice):
    """Some rows of a conditioning (one tensor, or SDXL's dict of them)."""
    return {k: v[rows] for k, v in cond.items()} if isinstance(cond, dict) else cond[rows]


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


def _save_after_failure(save_state, streams) -> None:
    try:
        save_state(streams=streams)
    except Exception:  # the original error is what the user must see; a failed state save only means no resume
        log.exception("lohatrain: could not save the run's state after an error")


def _tensors(cond) -> list[torch.Tensor]:
    """The tensors of a conditioning: one tensor (SD1, SD2) or a dict of them (SDXL)."""
    return list(cond.values()) if isinstance(cond, dict) else [cond]


def _token_rows(cond) -> torch.Tensor:
    """The per-token part of a conditioning: the tensor itself (SD1, SD2) or SDXL's "crossattn"."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _to_float(cond):
    return {k: v.float() for k, v in cond.items()} if isinstance(cond, dict) else cond.float()


def training_alphas_cumprod(alphas_cumprod: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The checkpoint's noise schedule (`family.alphas_cumprod`) in float32, optionally rescaled to zero terminal
    SNR; the model's buffer is never changed."""
    schedule = alphas_cumprod.detach().to("cpu", torch.float64)
    if zero_terminal_snr:
        schedule = rescale_zero_terminal_snr(schedule)
    return schedule.float()


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1: shift
    sqrt(ᾱ) so the last timestep is 0 (pure noise, SNR 0) and scale it so the first keeps its value."""
    sqrt_ab = alphas_cumprod.sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab ** 2


# Captions per text-encoder pass while caching: the host's per-call work (its option overlays, Forge's model
# load and copies out of inference mode) is paid once per 16 captions, while 16 rows of 77 tokens keep the
# activations of even SDXL's bigG encoder to tens of MB, nothing next to an 8 GB card.
CAPTION_BATCH = 16
CHUNK_TOKENS = 77  # one 75-token chunk with its start and end tokens


def _cache_conditioning(encode_prompts, captions: list[str], autocast) -> dict[str, object]:
    """Each distinct caption through the text encoder once (float32), CAPTION_BATCH to a pass.

    Shortest first (then alphabetical): the same dataset always makes the same passes, so the same bits, and
    the captions past 75 tokens mostly meet in the last passes. The host pads every row of a pass to its
    longest caption's chunk count; a caption must keep its own count (attention over extra padding keys changes
    the result), so a pass that comes back longer than one chunk is encoded again one caption at a time."""
    conditioning = {}
    ordered = sorted(set(captions), key=lambda c: (len(c), c))
    with torch.no_grad(), autocast():
        for start in range(0, len(ordered), CAPTION_BATCH):
            batch = ordered[start:start + CAPTION_BATCH]
            cond = _to_float(encode_prompts(batch))
            if len(batch) > 1 and _token_rows(cond).shape[1] > CHUNK_TOKENS:
                conditioning.update((c, _to_float(encode_prompts([c]))) for c in batch)
            else:
                conditioning.update((c, _rows(cond, slice(i, i + 1))) for i, c in enumerate(batch))
        shapes = {tuple(t.shape for t in _tensors(c)) for c in conditioning.values()}
        if len(shapes) > 1 and "" not in conditioning:  # captions past 75 tokens: pad with the empty one
            conditioning[""] = _to_float(encode_prompts([""]))
    return conditioning


def _cache_latents(model, family, items, bucket_of, needed: set[int], settings, device, autocast, stop,
                   seed) -> dict[int, _Sample] | None:
    """Each needed image through the VAE once (twice with flip augmentation); colour augmentation keeps pixels.
    Each image's VAE sample has its own seed, so which images are cached changes none of them."""
    samples = {}
    for index in sorted(needed):
        item, bucket = items[index], bucket_of[index]
        if stop():
            return None
        image = ds.load_image(item.path)
        pixels, (top, left) = ds.prepare_image(image, bucket)
        resized_w = ds.cover_size(image.size, bucket)[0]
        target = (bucket[1], bucket[0])
        with torch.no_grad(), autocast():
            latent = _encode(model, family, pixels[None], device, seed + 2 * index)
            flipped = (_encode(model, family, ds.flip(pixels)[None], device, seed + 2 * index + 1)
                       if settings.flip_aug else None)
        samples[index] = _Sample(item, bucket, pixels if settings.color_aug else None, latent, flipped,
                                 (image.height, image.width, top, left, *target),
                                 (image.height, image.width, top, resized_w - left - bucket[0], *target))
    return samples


def _encode(model, family, pixels, device, seed: int) -> torch.Tensor:
    """VAE latents; the VAE samples its posterior from the global RNG, so fork it under our own seed.

    A VAE in fp16 can overflow to NaN (SDXL's own VAE does, which is why the WebUI has --no-half-vae): then
    the image is encoded again with the VAE in float32 (ModelGuard puts its dtype back after the run).
    """
    vae = family.vae(model)
    for in_float32 in (False, True):
        if in_float32:
            vae.float()
        # autocast stays as the caller set it the first time, and is off for the float32 retry
        with seeded_global_rng(seed), (torch.autocast(device.type, enabled=False) if in_float32 else nullcontext()):
            latent = family.encode_images(model, pixels.to(device, next(vae.parameters()).dtype)).float()
        if torch.isfinite(latent).all():
            return latent
    raise LohatrainError("the VAE gives NaN or infinite latents for an image even in float32: the checkpoint's "
                         "VAE may be broken; try another VAE in the WebUI's settings")


def _batch_latents(model, family, batch: list[_Sample], augmentations: list[_Augmentation], settings, device,
                   autocast):
    """Latents and size conditioning for one batch: cached latents, or (colour augmentation) a fresh VAE pass
    of the changed pixels."""
    latents, sizes = [], []
    for s, aug in zip(batch, augmentations):
        sizes.append(s.sizes_flipped if aug.flip else s.sizes)
        if aug.color:
            pixels = ds.change_colors(ds.flip(s.pixels) if aug.flip else s.pixels, *aug.color)
            with torch.no_grad(), autocast():
                latents.append(_encode(model, family, pixels[None], device, aug.vae_seed))
        else:
            latents.append(s.latent_flipped if aug.flip else s.latent)
    return torch.cat(latents), sizes


def _checkpoint_blocks(unet) -> None:
    """torch's non-reentrant checkpointing around each UNet block (ModelGuard removes it afterwards)."""
    blocks = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for block in blocks:
        block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


def _lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    warmup, total = settings.lr_warmup_steps, settings.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if settings.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if settings.lr_scheduler == "linear":
            return 1 - progress
        return 1.0

    return factor


def _activation_text(settings: TrainSettings, items) -> str:
    if settings.caption_mode == "phrase":
        return settings.caption_phrase
    first_tags = [i.caption.split(",")[0].strip() for i in items if i.caption.strip()]
    return max(sorted(set(first_tags)), key=first_tags.count) if first_tags else ""


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
