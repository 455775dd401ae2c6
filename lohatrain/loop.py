"""The training loop: a `LoopState` (everything a step changes, and so everything resume saves) advanced one step at
a time over what stays fixed for the run (`Setup`).

A step: draw a batch (its images' cached latents, flipped or colour-changed as drawn), its noise and timesteps,
predict, take the loss, update. Every process of a data-parallel run draws the whole batch's random numbers from the
same streams and trains its share of the images, so each image gets what it gets in a one-process run.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import dataset as ds
from .cache import Cache, Sample, encode, rows
from .distributed import Ranks
from .errors import LohatrainError
from .parts import ModelParts
from .settings import TrainSettings


class LoopState:
    """The loop's moving parts, in one object: the loop reads and advances them; lohatrain.run_state saves and
    restores them."""

    def __init__(self, network, optimizer, scheduler, scaler, sampler: ds.BucketBatchSampler,
                 noise_gen: torch.Generator, aug_gen: torch.Generator, caption_rng: random.Random):
        self.network, self.optimizer, self.scheduler, self.scaler = network, optimizer, scheduler, scaler
        self.sampler, self.noise_gen, self.aug_gen, self.caption_rng = sampler, noise_gen, aug_gen, caption_rng
        self.step = 0
        self.losses: list[float] = []
        self.smooth: float | None = None

    def streams(self) -> dict:
        """The random streams now (cheap: a few kB); a state saved after an error uses the streams from the
        end of the last whole step."""
        return {"sampler": self.sampler.state_dict(), "noise": self.noise_gen.get_state(),
                "aug": self.aug_gen.get_state(), "caption": list_random_state(self.caption_rng.getstate())}


def list_random_state(state) -> list:
    """Python's random state with lists for tuples (JSON)."""
    version, internal, gauss = state
    return [version, list(internal), gauss]


@dataclass(frozen=True)
class Setup:
    """What every step uses and no step changes."""

    parts: ModelParts
    predict: nn.Module  # the model's prediction, holding the network (DistributedDataParallel wraps it)
    cache: Cache
    settings: TrainSettings
    encode_prompts: Callable[[list[str]], object]
    train_text: bool
    alphas_cumprod: torch.Tensor  # float32, on the device
    device: torch.device
    autocast: Callable
    ranks: Ranks
    loss_weights: torch.Tensor | None = None  # each image's weight in the loss (regularization images'), or None


class Diverged(LohatrainError):
    """The loss is not finite: the weights are broken, so no state is saved from them."""


def run(setup: Setup, loop: LoopState, stop: Callable[[], bool], after_step: Callable[[int], None]) -> str:
    """Steps until the run's last one ("done") or until `stop()` turns true ("interrupted"); `after_step(step)`
    after each (progress, previews, periodic saves)."""
    while loop.step < setup.settings.steps:
        if setup.ranks.any(stop()):
            return "interrupted"
        step(setup, loop)
        after_step(loop.step)
    return "done"


def step(setup: Setup, loop: LoopState) -> None:
    """One optimisation step: a batch, its noise and timesteps, the loss, the update; it advances `loop`."""
    settings, ranks, device = setup.settings, setup.ranks, setup.device
    indexes = loop.sampler.next_batch()
    share = ranks.share(len(indexes))
    augmentations = [Augmentation.draw(settings, loop.aug_gen) for _ in indexes]
    latents, sizes, masks = batch_latents(setup, [setup.cache.samples[i] for i in indexes[share]],
                                          augmentations[share])
    cond = setup.parts.condition_on_images(rows(conditioning(setup, loop, indexes), share), sizes)

    shape = (len(indexes), *latents.shape[1:])
    noise = draw_noise(settings, loop.noise_gen, shape)[share].to(device)
    timesteps = draw_timesteps(settings, len(setup.alphas_cumprod), len(indexes), loop.noise_gen)[share].to(device)
    perturbation = None
    if settings.ip_noise_gamma:
        perturbation = settings.ip_noise_gamma * torch.randn(shape, generator=loop.noise_gen)[share].to(device)
    ac = setup.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy, target = noisy_and_target(latents, noise, ac, setup.parts.v_prediction, perturbation)

    with setup.autocast():
        prediction = setup.predict(noisy, timesteps, cond)
    weights = None if setup.loss_weights is None else setup.loss_weights[indexes][share].to(device)
    # the mean over the share: the processes' average gradient is the whole batch's
    loss = image_losses(setup, prediction.float(), target, masks, timesteps, weights).mean()
    batch_loss = ranks.mean(loss)  # before the update: a process lost here leaves the weights of the last step
    loop.scaler.scale(loss).backward()
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.step += 1

    value = batch_loss.item()
    if not math.isfinite(value):
        raise Diverged(f"training diverged at step {loop.step} (loss is {value}): lower the learning rate, or "
                       "use bf16 or fp32 instead of fp16")
    loop.losses.append(value)
    loop.smooth = value if loop.smooth is None else 0.9 * loop.smooth + 0.1 * value


def image_losses(setup: Setup, prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None,
                 timesteps: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each image's loss, in kohya's order: the elementwise loss (`loss_type`) weighted by its mask (masked loss)
    and averaged, times its own weight (`prior_loss_weight` for a regularization image), then weighted by its
    timestep's SNR."""
    loss = elementwise_loss(prediction, target, setup.settings, timesteps, setup.alphas_cumprod)
    if masks is not None:
        loss = loss * masks
    loss = loss.mean(dim=(1, 2, 3))
    if weights is not None:
        loss = loss * weights
    return weighted_by_snr(loss, setup.alphas_cumprod[timesteps], setup.settings, setup.parts.v_prediction)


def conditioning(setup: Setup, loop: LoopState, indexes: list[int]):
    """The whole batch's captions as drawn (shuffled, dropped: lohatrain.dataset.CaptionVariation), encoded
    (shuffled tags, or a trained text encoder) or stacked from the cache: a batch pads every caption to its longest,
    as in a one-process run."""
    variation = ds.CaptionVariation.of(setup.settings)
    captions = [variation.apply(setup.cache.captions[i], loop.caption_rng) for i in indexes]
    if setup.cache.per_step_text:
        with torch.set_grad_enabled(setup.train_text), setup.autocast():
            return setup.encode_prompts(captions)
    conds = setup.cache.conditioning
    return setup.parts.family.stack_conditioning([conds[c] for c in captions], conds.get(""))


def batch_latents(setup: Setup, batch: list[Sample], augmentations: list["Augmentation"]):
    """Latents, size conditioning and (masked loss) loss masks for one batch: cached latents, or (colour
    augmentation) a fresh VAE pass of the changed pixels."""
    latents, sizes, masks = [], [], []
    for s, aug in zip(batch, augmentations):
        sizes.append(s.sizes_flipped if aug.flip else s.sizes)
        if setup.settings.masked_loss:
            masks.append(s.loss_mask(aug.flip))
        if aug.color:
            pixels = ds.change_colors(ds.flip(s.pixels) if aug.flip else s.pixels, *aug.color)
            with torch.no_grad(), setup.autocast():
                latents.append(encode(setup.parts, pixels[None], setup.device, aug.vae_seed))
        else:
            latents.append(s.latent_flipped if aug.flip else s.latent)
    return torch.cat(latents), sizes, torch.cat(masks) if masks else None


# --- noise, timesteps and loss (kohya sd-scripts' options, by its names: library/train_util.py and
# custom_train_functions.py); with every option off each is the plain DDPM step's, with the same random draws

def draw_noise(settings: TrainSettings, gen: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole batch's noise: Gaussian, plus the noise offset (one value per image and channel), then multires
    noise over both, in kohya's order."""
    noise = torch.randn(shape, generator=gen)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn(shape[:2] + (1, 1), generator=gen)
    if settings.multires_noise_iterations:
        noise = pyramid_noise(noise, settings.multires_noise_iterations, settings.multires_noise_discount, gen)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float, gen: torch.Generator) -> torch.Tensor:
    """Multires noise (J. Whitaker, "Multi-Resolution Noise for Diffusion Model Training"; kohya's
    pyramid_noise_like): level i adds Gaussian noise drawn r^i times coarser (r in [2, 4), drawn per level) and
    bilinearly upsampled, weighted discount^i, down to a 1-pixel level; the sum is scaled to unit deviation."""
    b, c, h, w = noise.shape
    for i in range(iterations):
        r = torch.rand((), generator=gen, dtype=torch.float64).item() * 2 + 2
        coarse_h, coarse_w = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        coarse = torch.randn((b, c, coarse_h, coarse_w), generator=gen)
        noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * discount ** i
        if coarse_h == 1 or coarse_w == 1:
            break
    return noise / noise.std()


def draw_timesteps(settings: TrainSettings, schedule_length: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform over [min_timestep, max_timestep): by default the whole schedule."""
    return torch.randint(settings.min_timestep, min(settings.max_timestep, schedule_length), (count,), generator=gen)


def noisy_and_target(latents: torch.Tensor, noise: torch.Tensor, ac: torch.Tensor, v_prediction: bool,
                     perturbation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process, √ᾱ·x₀ + √(1 - ᾱ)·ε, and what the model is to predict: ε, or v = √ᾱ·ε - √(1 - ᾱ)·x₀.
    Input perturbation (Ning et al. 2023, kohya's ip_noise_gamma) noises the input with ε + γ·ε′ and keeps ε in
    the target."""
    seen = noise if perturbation is None else noise + perturbation
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * seen
    return noisy, ac.sqrt() * noise - (1 - ac).sqrt() * latents if v_prediction else noise


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, settings: TrainSettings,
                     timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """kohya's conditional_loss, per element: squared error (l2), absolute error (l1), or with d the error and c
    the image's threshold (huber_threshold) pseudo-Huber 2c(sqrt(d² + c²) - c) (huber) or 2(sqrt(d² + c²) - c)
    (smooth_l1): quadratic for errors below c, linear above."""
    if settings.loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if settings.loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    c = huber_threshold(settings, timesteps, alphas_cumprod).view(-1, 1, 1, 1)
    excess = ((prediction - target) ** 2 + c ** 2).sqrt() - c
    return 2 * c * excess if settings.loss_type == "huber" else 2 * excess


def huber_threshold(settings: TrainSettings, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Each image's Huber threshold c by kohya's huber_schedule: `constant` huber_c; `exponential` from 1 at
    timestep 0 down to huber_c at the schedule's end, exp(t·ln(huber_c)/T); `snr` (1 - huber_c)/(1 + σ)² + huber_c
    with σ = sqrt((1 - ᾱ)/ᾱ), near 1 where there is little noise and huber_c where there is much. huber_scale
    multiplies the first two."""
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, settings.huber_c * settings.huber_scale, device=timesteps.device)
    if settings.huber_schedule == "exponential":
        rate = math.log(settings.huber_c) / len(alphas_cumprod)
        return torch.exp(timesteps.float() * rate) * settings.huber_scale
    ac = alphas_cumprod[timesteps]
    sigma = ((1 - ac) / ac).sqrt()
    return (1 - settings.huber_c) / (1 + sigma) ** 2 + settings.huber_c


def weighted_by_snr(loss: torch.Tensor, ac: torch.Tensor, settings: TrainSettings, v_prediction: bool) -> torch.Tensor:
    """Each image's loss weighted by its timestep's signal-to-noise ratio SNR = ᾱ/(1 - ᾱ): Min-SNR (Hang et al.
    2023: min(SNR, gamma)/SNR, or /(SNR + 1) for v-prediction), then debiased estimation (Yu et al. 2023:
    1/sqrt(SNR), or 1/(SNR + 1) for v-prediction, SNR capped at 1000 as kohya's apply_debiased_estimation)."""
    snr = ac / (1 - ac)
    if settings.min_snr_gamma:
        loss = loss * (snr.clamp(max=settings.min_snr_gamma) / (snr + 1 if v_prediction else snr))
    if settings.debiased_estimation_loss:
        capped = snr.clamp(max=1000)
        loss = loss * (1 / (capped + 1) if v_prediction else 1 / capped.sqrt())
    return loss


@dataclass
class Augmentation:
    """What is drawn for one image of a batch: a mirror flip, and a colour change with its VAE sample's seed."""

    flip: bool
    color: tuple[float, float, float] | None
    vae_seed: int | None

    @staticmethod
    def draw(settings, gen: torch.Generator) -> "Augmentation":
        flip = settings.flip_aug and torch.rand((), generator=gen).item() < 0.5
        if not settings.color_aug:
            return Augmentation(flip, None, None)
        color = ds.color_change(gen)
        return Augmentation(flip, color, int(torch.randint(2**31, (), generator=gen)))


class Prediction(nn.Module):
    """The model's prediction as a module that holds the network and not the model: DistributedDataParallel
    averages the gradients of a module's parameters when its forward has run, and the network works hooked
    into the model's own layers; the model's frozen weights stay outside, so nothing syncs them."""

    def __init__(self, network: nn.Module, predict: Callable):
        super().__init__()
        self.network = network
        self.predict = predict

    def forward(self, noisy, timesteps, cond):
        return self.predict(noisy, timesteps, cond)


class Rate:
    """Steps per second and the time left, measured from the first step this process ran."""

    def __init__(self, first_step: int):
        self.first_step, self.started = first_step, time.perf_counter()

    def at(self, step: int, total: int) -> tuple[float | None, float | None]:
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / elapsed if elapsed > 0 else None
        return rate, (total - step) / rate if rate else None


def checkpoint_blocks(unet: nn.Module) -> None:
    """torch's non-reentrant checkpointing around each UNet block (ModelGuard removes it afterwards)."""
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.forward = partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


def lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
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


def training_alphas_cumprod(alphas_cumprod: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The checkpoint's noise schedule in float32, optionally rescaled to zero terminal SNR; the model's buffer is
    never changed."""
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
