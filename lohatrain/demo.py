"""Tiny, randomly initialised SD1- and SD2-shaped models and a procedural dataset.

They exist so that training, saving and loading can be exercised end to end
without a real checkpoint, a GPU or a network: `build_tiny_sd1` returns the
same kind of object the WebUI holds for an SD1 checkpoint (an ldm
`LatentDiffusion` with SD1's module names), with 11M parameters instead of 1B;
`build_tiny_sd2` the same for SD2.x (v2-inference-v.yaml / v2-inference.yaml),
with an OpenCLIP-shaped text encoder. Their text encoders are lohatrain.text_encoders',
at tiny sizes.

Only the demo command (`python -m lohatrain train --demo`), the tests, the benchmarks
and the tools import this module (and lohatrain.demo_sdxl), never the engine.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path

import torch
from torch import nn

from . import ldm_importable  # noqa: F401  (first: makes ldm importable)
from ldm.models.diffusion.ddpm import LatentDiffusion  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

TEXT_HIDDEN_SIZE = 32

_LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"

# The `model.params` of SD1's v1-inference.yaml, shrunk.
TINY_SD1_CONFIG = {
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "num_timesteps_cond": 1,
    "log_every_t": 200,
    "timesteps": 1000,
    "first_stage_key": "jpg",
    "cond_stage_key": "txt",
    "image_size": 8,
    "channels": 4,
    "cond_stage_trainable": False,
    "conditioning_key": "crossattn",
    "monitor": "val/loss_simple_ema",
    "scale_factor": 0.18215,
    "use_ema": False,
    "parameterization": "eps",
    "unet_config": {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": TEXT_HIDDEN_SIZE,
            "use_checkpoint": True,
            "legacy": False,
        },
    },
    "first_stage_config": {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 2, 2, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    },
    "cond_stage_config": {
        "target": "lohatrain.text_encoders.CLIPEmbedder",
        "params": {"hidden_size": TEXT_HIDDEN_SIZE, "num_layers": 3, "num_heads": 4, "intermediate_size": 64},
    },
}


# Brings the tiny VAE's scaled latents (of the sample images) to a std of about 1.
_LATENT_GAIN = 20.0


def _reinit_degenerate_layers(unet: nn.Module, text_encoders: nn.Module, vae: nn.Module,
                              latent_gain: float = _LATENT_GAIN) -> None:
    """Undo initialisations that make a random model useless for testing training.

    - ldm zero-initialises output layers (SpatialTransformer `proj_out`, ResBlock
      `out_layers.3`, UNet `out.2`); behind a zero layer no gradient reaches anything.
    - A CLIP (or OpenCLIP) with LayerNorm weight 1 / bias 0 produces zero-mean
      embeddings, and the WebUI's emphasis renormalisation divides by that mean.
    - A random VAE's latents are mostly sampling noise (posterior std near 1) and,
      once multiplied by SD1's scale_factor, tiny (std ~0.05). A real SD VAE's
      posterior is nearly deterministic and its scaled latents have std ~1.
    """
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    for module in text_encoders.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.2)
            nn.init.normal_(module.bias, mean=0.1, std=0.2)
    with torch.no_grad():
        vae.quant_conv.weight[: vae.embed_dim] *= latent_gain  # mean half
        vae.quant_conv.bias[: vae.embed_dim] *= latent_gain
        vae.quant_conv.bias[vae.embed_dim :] = -10.0  # logvar half: posterior std ~0.007
        vae.post_quant_conv.weight /= latent_gain


def build_tiny_sd1(seed: int = 0) -> LatentDiffusion:
    """A tiny random SD1 model: ldm `LatentDiffusion` with SD1's UNet layout and
    module names, a tiny `AutoencoderKL` (8x downsampling, 4 latent channels) and a
    tiny CLIP text model behind the real CLIP tokenizer. CPU, float32, eval mode.

    Deterministic for `seed`; the caller's global RNG state is left untouched.
    """
    return _build(TINY_SD1_CONFIG, seed, family="sd1")


def _build(config: dict, seed: int, family: str) -> LatentDiffusion:
    """Instantiate a LatentDiffusion config under a forked, seeded RNG, with the host's `is_*` flags."""
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        model = instantiate_from_config(OmegaConf.create({"target": _LATENT_DIFFUSION, "params": config}))
        _reinit_degenerate_layers(model.model.diffusion_model, model.cond_stage_model, model.first_stage_model)
    model.eval()
    model.is_sd1 = family == "sd1"
    model.is_sd2 = family == "sd2"
    model.is_sdxl = False
    return model


SD2_TEXT_WIDTH = 48  # not SD1's 32: the UNet's context_dim must follow the text encoder's width

# The `model.params` of SD2's v2-inference-v.yaml (768-v; v2-inference.yaml, the 512 base, differs only in
# predicting eps), shrunk. SD2 uses linear proj_in/proj_out and a fixed head width (64 there, 8 here).
TINY_SD2_CONFIG = {
    **{k: v for k, v in TINY_SD1_CONFIG.items() if k not in ("unet_config", "cond_stage_config")},
    "parameterization": "v",
    "unet_config": {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            **{k: v for k, v in TINY_SD1_CONFIG["unet_config"]["params"].items() if k != "num_heads"},
            "num_head_channels": 8,
            "use_linear_in_transformer": True,
            "context_dim": SD2_TEXT_WIDTH,
        },
    },
    "cond_stage_config": {
        "target": "lohatrain.text_encoders.OpenCLIPEmbedder",
        "params": {"width": SD2_TEXT_WIDTH, "layers": 3, "heads": 4, "freeze": True, "layer": "penultimate"},
    },
}


def build_tiny_sd2(seed: int = 0, v_prediction: bool = True) -> LatentDiffusion:
    """A tiny random SD2.x model: ldm `LatentDiffusion` with SD2's UNet (SD1's layout, linear
    proj_in/proj_out, fixed head width), a tiny `AutoencoderKL` and a tiny OpenCLIP text encoder
    (`text_encoders.OpenCLIPEmbedder`, penultimate layer) behind the real CLIP tokenizer. `v_prediction` selects the
    768-v model's "v" parameterization; False gives the 512-base model's "eps". CPU, float32, eval mode.

    Deterministic for `seed`; the caller's global RNG state is left untouched.
    """
    config = {**TINY_SD2_CONFIG, "parameterization": "v" if v_prediction else "eps"}
    return _build(config, seed, family="sd2")


_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "stripes")
_SIZES = ((96, 96), (128, 96), (96, 128), (160, 96), (64, 64), (96, 160), (128, 128), (112, 80))


def make_sample_dataset(folder: Path, seed: int = 0) -> Path:
    """Write 8 small procedural PNGs with same-named booru-style `.txt` captions into
    `folder` (created if needed) and return it: the built-in demo dataset.
    Deterministic for `seed`."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colour_names = list(_COLOURS)
    for index, (width, height) in enumerate(_SIZES):
        shape = _SHAPES[index % len(_SHAPES)]
        fg, bg = rng.sample(colour_names, 2)
        image = Image.new("RGB", (width, height), _COLOURS[bg])
        draw = ImageDraw.Draw(image)
        size = rng.randint(min(width, height) // 2, min(width, height) * 4 // 5)
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[fg])
        elif shape == "triangle":
            draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=_COLOURS[fg])
        else:
            stripe = max(4, min(width, height) // 12)
            for x in range(rng.randint(0, stripe), width, 2 * stripe):
                draw.rectangle((x, 0, x + stripe - 1, height), fill=_COLOURS[fg])
        tags = [f"{fg} {shape}", f"{bg} background", "simple"]
        if width != height:
            tags.append("wide" if width > height else "tall")
        name = f"sample_{index:02d}"
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    return folder
