"""What the engine's tests share: a small run's settings, a run stopped as Interrupt stops it and resumed, the state a
run must leave a model in, the loss a trained file must lower (SD1/SD2 and SDXL), the modules a file must reach, the
tiny model of each family, the model held as the WebUI holds it, and a small dataset with masks. A plain module the
test files import (fixtures are in conftest.py)."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from lohatrain import dataset as ds
from lohatrain.families import ldm_parts
from lohatrain.run_state import read_state
from lohatrain.settings import TrainSettings
from lohatrain.sgm_standin import SIZE_KEYS
from lohatrain.trainer import Hooks, train

from host_rules import find_module, group_keys

# Every random stream a run draws from, and a text encoder trained beside the UNet.
EVERY_STREAM = dict(flip_aug=True, color_aug=True, shuffle_tags=True, text_encoder_lr=1e-3, lr_scheduler="cosine",
                    lr_warmup_steps=1, noise_offset=0.05)


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    base = TrainSettings(name="test-loha", dataset_dir=str(dataset), output_dir=str(out), resolution=64,
                         bucket_min_side=64, bucket_max_side=128, steps=6, batch_size=2, learning_rate=3e-3,
                         train_dtype="fp32", save_dtype="fp32", gradient_checkpointing=False, seed=7,
                         ).with_preset("small")
    return dataclasses.replace(base, **overrides)


def stopping_at(step: int) -> Hooks:
    """Hooks that stop a run after `step` steps, as the Interrupt button does."""
    done = []
    return Hooks(on_step=lambda s, network: done.append(s), stop=lambda: len(done) >= step)


def resume_run(model, folder: Path, name: str = "test-loha"):
    """Resume the run saved in `folder` from its state file, with the settings it recorded."""
    saved = read_state(folder / f"{name}.lohatrain-state")
    return train(ldm_parts(model), saved.record.settings, resume=saved)


def lora_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def model_state(model) -> dict:
    """Everything ModelGuard promises to restore, as comparable values."""
    return {
        "tensors": {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                      if v.dtype != torch.bool else v.numpy().tobytes()).hexdigest()
                    for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()},
        "placement": {k: (str(v.device), str(v.dtype), v.requires_grad) for k, v in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "forwards": {k: "forward" in m.__dict__ for k, m in model.named_modules()},
        "ldm_flags": {k: (m.__dict__.get("checkpoint"), m.__dict__.get("use_checkpoint"))
                      for k, m in model.named_modules()},
    }


def hold_like_the_webui(model, held: str):
    """The model as the WebUI v1.10.1 holds it on a GPU (modules/sd_models.py, load_model_weights): `held` "fp16"
    (half(), its default) or "bf16", keeping alphas_cumprod float32; "fp8": its FP8 weight option on top of half,
    every Linear and Conv2d outside the VAE in float8."""
    alphas_cumprod = model.alphas_cumprod
    model.alphas_cumprod = None
    model.to(torch.bfloat16 if held == "bf16" else torch.float16)
    model.alphas_cumprod = alphas_cumprod
    if held == "fp8":
        vae, model.first_stage_model = model.first_stage_model, None
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.to(torch.float8_e4m3fn)
        model.first_stage_model = vae
    return model


def family_model(family: str, seed: int = 0):
    """The tiny model of a family: SD1, SD2 (768-v) or SDXL."""
    from lohatrain.demo import build_tiny_sd1, build_tiny_sd2
    from lohatrain.demo_sdxl import build_tiny_sdxl

    return {"sd1": build_tiny_sd1, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl}[family](seed)


@torch.no_grad()
def denoising_loss(model, dataset: Path, seed: int = 0) -> float:
    """Mean prediction error on the dataset's images over fixed noise and timesteps, against the model's own
    target: the noise, or ldm's `get_v` for a v-prediction model (SDXL: `sdxl_denoising_loss`)."""
    if getattr(model, "is_sdxl", False):
        return sdxl_denoising_loss(model, dataset, seed)
    items = ds.scan_dataset(dataset, "txt")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for item in items:
        pixels, _ = ds.prepare_image(ds.load_image(item.path), (64, 64))
        latent = model.get_first_stage_encoding(model.encode_first_stage(pixels[None]))
        cond = model.get_learned_conditioning([item.caption])
        for t in (100, 400, 700):
            noise = torch.randn(latent.shape, generator=gen)
            timestep = torch.tensor([t])
            pred = model.apply_model(model.q_sample(latent, timestep, noise), timestep, cond)
            target = model.get_v(latent, noise, timestep) if model.parameterization == "v" else noise
            total += torch.mean((pred - target) ** 2).item()
    return total / (3 * len(items))


def sdxl_conditioning(model, captions: list[str], sizes: list[tuple[int, ...]]) -> dict:
    """sgm's conditioner called directly, as sgm's own training does, with each image's sizes."""
    values = torch.tensor(sizes, dtype=torch.float32)
    batch = {"txt": captions, **{key: values[:, 2 * i:2 * i + 2] for i, key in enumerate(SIZE_KEYS)}}
    return model.conditioner(batch)


def image_sizes(dataset, bucket=(64, 64)) -> dict[str, tuple[int, ...]]:
    """Each image's (original h, w, crop top, left, target h, w), worked out from the files themselves."""
    sizes = {}
    for item in ds.scan_dataset(dataset, "txt"):
        image = ds.load_image(item.path)
        scale = max(bucket[0] / image.width, bucket[1] / image.height)
        resized_w, resized_h = round(image.width * scale), round(image.height * scale)
        sizes[item.caption] = (image.height, image.width, (resized_h - bucket[1]) // 2,
                               (resized_w - bucket[0]) // 2, bucket[1], bucket[0])
    return sizes


@torch.no_grad()
def sdxl_denoising_loss(model, dataset, seed: int = 0) -> float:
    """Mean noise-prediction error over the dataset's images at fixed noise and timesteps, each image conditioned
    on its own sizes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = image_sizes(dataset)
    total, count = 0.0, 0
    for item in ds.scan_dataset(dataset, "txt"):
        pixels, _ = ds.prepare_image(ds.load_image(item.path), (64, 64))
        latent = model.encode_first_stage(pixels[None])
        cond = sdxl_conditioning(model, [item.caption], [sizes[item.caption]])
        for t in (100, 400, 700):
            noise = torch.randn(latent.shape, generator=gen)
            ac = model.alphas_cumprod[t]
            noisy = ac.sqrt() * latent + (1 - ac).sqrt() * noise
            total += torch.mean((model.model(noisy, torch.tensor([t]), cond) - noise) ** 2).item()
            count += 1
    return total / count


def expected_unet_targets(unet, conv: bool) -> set[int]:
    """UNet modules a LoHa must cover, enumerated independently of lohatrain's planner: the attention blocks'
    Linears and 1x1 convs, and with `conv` the layers of ResBlocks and down/up-samplers."""
    expected = set()
    for block in unet.modules():
        kind = type(block).__name__
        if kind == "SpatialTransformer" or (conv and kind in ("ResBlock", "Downsample", "Upsample")):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and (
                        conv or m.kernel_size == (1, 1))):
                    expected.add(id(m))
    return expected


def modules_the_host_loads(model, tensors: dict) -> tuple[set[int], dict[int, set[str]]]:
    """Each LoHa of a file as the host loads it: all five tensors, a module found by the host's rules and
    factor shapes that fit it. Returns the ids of the modules hit and, per fused attention, which of q, k, v
    landed on it (out lands on its out_proj)."""
    covered, attention_parts = set(), {}
    for layer, w in group_keys(tensors).items():
        assert set(w) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, layer
        module = find_module(model, layer)
        assert module is not None, f"{layer} matches no module in the host"
        if isinstance(module, torch.nn.MultiheadAttention):  # q/k/v: a third of the fused in_proj_weight
            attention_parts.setdefault(id(module), set()).add(layer.rsplit("_", 2)[-2])
            out_dim, fan_in = module.embed_dim, module.in_proj_weight.shape[1]
        else:
            out_dim, fan_in = module.weight.shape[0], module.weight[0].numel()
        assert w["hada_w1_a"].shape == (out_dim, w["hada_w1_b"].shape[0]) and w["hada_w1_b"].dim() == 2
        assert w["hada_w1_b"].shape[1] == fan_in and w["hada_w2_b"].shape[1] == fan_in
        covered.add(id(module))
    return covered, attention_parts


def square_mask(start: int, stop: int, size: int = 64) -> Image.Image:
    """White inside the square [start, stop)², black elsewhere."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((start, start, stop - 1, stop - 1), fill=255)
    return mask


def write_dataset(folder: Path, masks: dict[int, Image.Image] | None = None, count: int = 4,
                  pixels_seed: int = 0) -> Path:
    """`count` 64×64 images (one bucket: two batches an epoch) with captions; `masks` beside some as
    img_N.mask.png. `pixels_seed` chooses image 0's pixels only."""
    folder.mkdir(parents=True)
    for i in range(count):
        rng = np.random.default_rng(pixels_seed if i == 0 else 100 + i)
        (folder / f"img_{i}.txt").write_text(f"shape {i}, simple")
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img_{i}.png")
        if masks and i in masks:
            masks[i].save(folder / f"img_{i}{ds.MASK_SUFFIX}")
    return folder
