"""The network presets' advertised SD1.5 file sizes, checked on a full-size SD1.5 UNet built on the meta device
(shapes only: no weights, no memory, milliseconds to build)."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import lohatrain.demo  # noqa: F401  (before ldm: installs the torchvision stand-in)
from lohatrain.families.sd1 import SD1
from lohatrain.network import LohaNetwork, count_parameters, plan_unet
from lohatrain.settings import PRESETS

# The `unet_config.params` of SD1.5's v1-inference.yaml.
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
ORDER = ["small", "medium", "high", "highest"]  # smallest first, as the settings promise
MB = 1e6  # decimal megabytes


@pytest.fixture(scope="module")
def sd15_unet():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
        unet = UNetModel(**SD15_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    return unet


def plans_for(unet, preset):
    # UNet only: the presets leave the text encoder untrained (text_encoder_lr defaults to 0).
    return plan_unet(SD1, unet, preset.dim, preset.alpha, preset.conv_dim, preset.conv_alpha)


def fp16_file_mb(unet, preset) -> float:
    """LoHa parameters (alpha scalars included) x 2 bytes: the tensor data of an fp16 file."""
    return count_parameters(plans_for(unet, preset)) * 2 / MB


@pytest.mark.parametrize("name", ORDER)
def test_advertised_file_size_matches_a_full_size_sd15_unet(sd15_unet, name):
    preset = PRESETS[name]
    actual = fp16_file_mb(sd15_unet, preset)
    assert preset.sd15_file_mb == pytest.approx(actual, rel=0.05), (
        f"{name}: settings say {preset.sd15_file_mb} MB, an SD1.5 fp16 file holds {actual:.1f} MB")


def test_presets_grow_strictly_from_small_to_highest(sd15_unet):
    assert list(PRESETS) == ORDER
    computed = [fp16_file_mb(sd15_unet, PRESETS[n]) for n in ORDER]
    advertised = [PRESETS[n].sd15_file_mb for n in ORDER]
    assert all(a < b for a, b in zip(computed, computed[1:])), computed
    assert all(a < b for a, b in zip(advertised, advertised[1:])), advertised


def test_parameter_count_is_what_the_network_saves(sd15_unet):
    """count_parameters agrees with the tensors a LohaNetwork writes (hada_w1_a … alpha) for a conv preset.
    lycoris cannot build on meta (it calls .item()), so the network is built on the CPU, then moved."""
    plans = plans_for(sd15_unet, PRESETS["high"])
    network = LohaNetwork(plans, seed=0).to("meta")
    saved = sum(t.numel() for lora in network.loras for t in lora.custom_state_dict().values())
    assert saved == count_parameters(plans)
