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
    latents, sizes = batch_latents(setup, [setup.cache.samples[i] for i in indexes[share]], augmentations[share])
    cond = setup.parts.condition_on_images(rows(conditioning(setup, loop, indexes), share), sizes)

    shape = (len(indexes), *latents.shape[1:])
    noise = torch.randn(shape, generator=loop.noise_gen)[share].to(device)
    if settings.noise_offset:
        noise += settings.noise_offset * torch.randn(shape[:2] + (1, 1), generator=loop.noise_gen)[share].to(device)
    timesteps = torch.randint(0, len(setup.alphas_cumprod), (len(indexes),), generator=loop.noise_gen)[share].to(device)
    ac = setup.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = ac.sqrt() * latents + (1 - ac).sqrt() * noise
    target = ac.sqrt() * noise - (1 - ac).sqrt() * latents if setup.parts.v_prediction else noise

    with setup.autocast():
        prediction = setup.predict(noisy, timesteps, cond)
    loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if setup.loss_weights is not None:
        loss = loss * setup.loss_weights[indexes][share].to(device)
    if settings.min_snr_gamma:
        snr = ac.flatten() / (1 - ac.flatten())
        weight = snr.clamp(max=settings.min_snr_gamma) / (snr + 1 if setup.parts.v_prediction else snr)
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
        raise Diverged(f"training diverged at step {loop.step} (loss is {value}): lower the learning rate, or "
                       "use bf16 or fp32 instead of fp16")
    loop.losses.append(value)
    loop.smooth = value if loop.smooth is None else 0.9 * loop.smooth + 0.1 * value


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
    """Latents and size conditioning for one batch: cached latents, or (colour augmentation) a fresh VAE pass
    of the changed pixels."""
    latents, sizes = [], []
    for s, aug in zip(batch, augmentations):
        sizes.append(s.sizes_flipped if aug.flip else s.sizes)
        if aug.color:
            pixels = ds.change_colors(ds.flip(s.pixels) if aug.flip else s.pixels, *aug.color)
            with torch.no_grad(), setup.autocast():
                latents.append(encode(setup.parts, pixels[None], setup.device, aug.vae_seed))
        else:
            latents.append(s.latent_flipped if aug.flip else s.latent)
    return torch.cat(latents), sizes


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
