"""Random SDXL-shaped models: the tiny one of the demo and the tests, and full-size ones for the benchmarks, built
as lohatrain.sgm_standin's `SDXLEngine` (what an SDXL checkpoint is built as outside the WebUI)."""
from __future__ import annotations

import contextlib
import io

import torch

from .demo import _LATENT_GAIN, TINY_SD1_CONFIG, _reinit_degenerate_layers
from .sgm_standin import (SIZE_KEYS, ConcatTimestepEmbedderND, GeneralConditioner, OpenCLIPEmbedder2,
                          SDXLCLIPEmbedder, SDXLEngine, SDXLUNet)
from ldm.models.autoencoder import AutoencoderKL  # after lohatrain's: they make ldm importable


# SDXL base's sizes (sd_xl_base.yaml). The tiny model keeps the layout and shrinks widths and depths.
FULL_SDXL = dict(model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), num_head_channels=64,
                 clip_l=dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
                 bigg=dict(width=1280, layers=32, heads=20), size_dim=256, vae_ch=128, vae_ch_mult=(1, 2, 4, 4),
                 vae_res_blocks=2)
TINY_SDXL = dict(model_channels=32, channel_mult=(1, 2, 4), transformer_depth=(0, 1, 2), num_head_channels=8,
                 clip_l=dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64),
                 bigg=dict(width=48, layers=3, heads=4), size_dim=16, vae_ch=32, vae_ch_mult=(1, 2, 2, 2),
                 vae_res_blocks=1)


def _vae(ch: int, ch_mult: tuple[int, ...], res_blocks: int) -> AutoencoderKL:
    ddconfig = {**TINY_SD1_CONFIG["first_stage_config"]["params"]["ddconfig"], "ch": ch, "ch_mult": list(ch_mult),
                "num_res_blocks": res_blocks}
    with contextlib.redirect_stdout(io.StringIO()):
        return AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=4)


def conditioning_widths(sizes: dict) -> tuple[int, int]:
    """(crossattn, vector) widths: CLIP-L's and bigG's hidden states side by side; bigG's pooled embedding and
    six size numbers."""
    return sizes["clip_l"]["hidden_size"] + sizes["bigg"]["width"], sizes["bigg"]["width"] + 6 * sizes["size_dim"]


def build_unet(sizes: dict, use_checkpoint: bool = True) -> SDXLUNet:
    """The UNet of `build_sdxl` alone (on the current default device), e.g. on the meta device for counting."""
    return SDXLUNet(sizes["model_channels"], sizes["channel_mult"], sizes["transformer_depth"],
                    *conditioning_widths(sizes), sizes["num_head_channels"], use_checkpoint=use_checkpoint)


def build_sdxl(sizes: dict = TINY_SDXL, seed: int = 0, device: str | torch.device = "cpu") -> SDXLEngine:
    """An SDXL-shaped `SDXLEngine` with random weights: `TINY_SDXL` (tests, demo) or `FULL_SDXL` (benchmarks:
    speed and memory do not depend on weight values). Deterministic for `seed`; the global RNG is untouched."""
    clip_l, bigg = sizes["clip_l"], sizes["bigg"]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = build_unet(sizes)
        embedders = [SDXLCLIPEmbedder(**clip_l, layer="hidden", layer_idx=clip_l["num_layers"] - 1),
                     OpenCLIPEmbedder2(**bigg, layer="penultimate")]
        embedders += [ConcatTimestepEmbedderND(sizes["size_dim"], key) for key in SIZE_KEYS]
        model = SDXLEngine(unet, GeneralConditioner(embedders),
                           _vae(sizes["vae_ch"], sizes["vae_ch_mult"], sizes["vae_res_blocks"]))
        if sizes is TINY_SDXL:  # as the tiny SD1; the gain brings SDXL's smaller scale factor to the same std
            _reinit_degenerate_layers(unet, model.conditioner, model.first_stage_model,
                                      _LATENT_GAIN * 0.18215 / model.scale_factor)
    return model.eval().requires_grad_(True)


def build_tiny_sdxl(seed: int = 0) -> SDXLEngine:
    """The tiny SDXL-shaped model of the tests (about 10M parameters, CPU, float32, eval mode)."""
    return build_sdxl(TINY_SDXL, seed)
