"""The dataset as the loop reads it, computed once before the first step: every needed image through the VAE (and
its mirror image, with flip augmentation), every distinct caption through the text encoder.

Each image's VAE sample has its own seed, so which images a process caches (several processes share a run) changes
none of them, and a resumed run caches the same latents as the run it continues.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import dataset as ds
from .errors import LohatrainError
from .parts import ModelParts
from .rng import seeded_global_rng

# Captions per text-encoder pass: the host's per-call work (option overlays, its memory manager loading the text
# encoder) is paid once per pass, and 16 rows of 77 tokens are tens of MB even through SDXL's OpenCLIP-bigG.
CAPTION_BATCH = 16
CHUNK_TOKENS = 77  # one 75-token chunk with its start and end tokens


@dataclass
class Sample:
    """One training image, ready for the loop: cached latents (plain and flipped) and its sizes."""

    item: ds.ImageItem
    bucket: tuple[int, int]
    pixels: torch.Tensor | None  # kept only when colour augmentation re-encodes every step
    latent: torch.Tensor
    latent_flipped: torch.Tensor | None
    sizes: tuple[int, ...]  # original (h, w), crop (top, left), target (h, w): SDXL's size conditioning
    sizes_flipped: tuple[int, ...]  # the same with the crop measured in the mirrored image
    mask: torch.Tensor | None = None  # masked loss: the image's mask at latent size, (1, 1, h, w) in [0, 1]

    def loss_mask(self, flipped: bool) -> torch.Tensor:
        """The loss mask, mirrored with the image; all ones for an image without a mask."""
        if self.mask is None:
            return torch.ones_like(self.latent[:, :1])
        return self.mask.flip(-1) if flipped else self.mask


@dataclass
class Cache:
    """The latents of every image this process trains on (by image index), every image's caption, and every
    caption's conditioning unless the text encoder runs each step (shuffled tags, or trained)."""

    samples: dict[int, Sample]
    captions: list[str]
    conditioning: dict[str, object]
    per_step_text: bool


def cache_latents(parts: ModelParts, items, bucket_of, needed: set[int], settings, device, autocast, stop,
                  seed: int) -> dict[int, Sample] | None:
    """Each needed image through the VAE once (twice with flip augmentation); colour augmentation keeps pixels;
    masked loss keeps each mask at latent size. None when `stop()` turned true meanwhile."""
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
            latent = encode(parts, pixels[None], device, seed + 2 * index)
            flipped = (encode(parts, ds.flip(pixels)[None], device, seed + 2 * index + 1)
                       if settings.flip_aug else None)
        mask = latent_mask(item, bucket, latent.shape[-2:], latent.device) if settings.masked_loss else None
        samples[index] = Sample(item, bucket, pixels if settings.color_aug else None, latent, flipped,
                                (image.height, image.width, top, left, *target),
                                (image.height, image.width, top, resized_w - left - bucket[0], *target), mask)
    return samples


def latent_mask(item: ds.ImageItem, bucket, latent_size, device="cpu") -> torch.Tensor | None:
    """An image's mask resized and cropped as its pixels are, then averaged over each latent pixel's area (kohya's
    apply_masked_loss, done once here rather than every step); None for an image without a mask."""
    mask = ds.load_mask(item)
    if mask is None:
        return None
    pixels = ds.prepare_mask(mask, bucket)
    return F.interpolate(pixels[None, None], size=tuple(latent_size), mode="area").to(device)


def cache_conditioning(encode_prompts, captions: list[str], autocast) -> dict[str, object]:
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
            cond = to_float(encode_prompts(batch))
            if len(batch) > 1 and _token_rows(cond).shape[1] > CHUNK_TOKENS:
                conditioning.update((c, to_float(encode_prompts([c]))) for c in batch)
            else:
                conditioning.update((c, rows(cond, slice(i, i + 1))) for i, c in enumerate(batch))
        shapes = {tuple(t.shape for t in _tensors(c)) for c in conditioning.values()}
        if len(shapes) > 1 and "" not in conditioning:  # captions past 75 tokens: pad with the empty one
            conditioning[""] = to_float(encode_prompts([""]))
    return conditioning


def encode(parts: ModelParts, pixels, device, seed: int) -> torch.Tensor:
    """VAE latents; the VAE samples its posterior from the global RNG, so fork it under our own seed.

    A VAE in fp16 can overflow to NaN (SDXL's own VAE does, which is why the WebUI has --no-half-vae): then
    the image is encoded again with the VAE in float32 (ModelGuard puts its dtype back after the run).
    """
    vae = parts.vae
    for in_float32 in (False, True):
        if in_float32:
            vae.float()
        # autocast stays as the caller set it the first time, and is off for the float32 retry
        with seeded_global_rng(seed), (torch.autocast(device.type, enabled=False) if in_float32 else nullcontext()):
            latent = parts.encode_images(pixels.to(device, next(vae.parameters()).dtype)).float()
        if torch.isfinite(latent).all():
            return latent
    raise LohatrainError("the VAE gives NaN or infinite latents for an image even in float32: the checkpoint's "
                         "VAE may be broken; try another VAE in the WebUI's settings")


def rows(cond, which: slice):
    """Some rows of a conditioning (one tensor, or SDXL's dict of them)."""
    return {k: v[which] for k, v in cond.items()} if isinstance(cond, dict) else cond[which]


def to_float(cond):
    return {k: v.float() for k, v in cond.items()} if isinstance(cond, dict) else cond.float()


def _tensors(cond) -> list[torch.Tensor]:
    """The tensors of a conditioning: one tensor (SD1, SD2) or a dict of them (SDXL)."""
    return list(cond.values()) if isinstance(cond, dict) else [cond]


def _token_rows(cond) -> torch.Tensor:
    """The per-token part of a conditioning: the tensor itself (SD1, SD2) or SDXL's "crossattn"."""
    return cond["crossattn"] if isinstance(cond, dict) else cond
