"""The network presets' advertised file sizes, checked on full-size SD1.5 and SDXL UNets built on the meta device
(shapes only: no weights, no memory, milliseconds to build)."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

import lohatrain.demo  # noqa: F401  (before ldm: installs the torchvision stand-in)
from lohatrain.demo_sdxl import FULL_SDXL, build_unet
from lohatrain.families.sd1 import SD1
from lohatrain.families.sdxl import SDXL
from lohatrain.network import count_parameters, plan_unet
from lohatrain.methods import TYPES
from lohatrain.settings import FAMILY_DEFAULTS, TrainSettings

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


@pytest.fixture(scope="module")
def sdxl_unet():
    with torch.device("meta"):
        unet = build_unet(FULL_SDXL)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base's UNet
    return unet


def plans_for(unet, preset, family=SD1):
    # UNet only: the presets leave the text encoder untrained (text_encoder_lr defaults to 0).
    return plan_unet(family, unet, preset.dim, preset.alpha, preset.conv_dim, preset.conv_alpha)


def fp16_file_mb(unet, preset, family=SD1, method="loha") -> float:
    """The file's numbers (alpha scalars included) x 2 bytes: the tensor data of an fp16 file."""
    return count_parameters(plans_for(unet, preset, family), method, preset.factor) * 2 / MB


@pytest.fixture
def full_unet(request):
    return request.getfixturevalue(request.param)


CASES = [("sd15_unet", "sd1", SD1), ("sdxl_unet", "sdxl", SDXL)]


@pytest.mark.parametrize("full_unet,family_name,family", CASES, indirect=["full_unet"], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("method", TYPES)
@pytest.mark.parametrize("name", ORDER)
def test_advertised_file_size_matches_a_full_size_unet(full_unet, family_name, family, method, name):
    preset = TYPES[method].presets[family_name][name]
    actual = fp16_file_mb(full_unet, preset, family, method)
    assert preset.file_mb == pytest.approx(actual, rel=0.05), (
        f"{method} {name}: settings say {preset.file_mb} MB, a full-size fp16 file holds {actual:.1f} MB")


@pytest.mark.parametrize("full_unet,family_name,family", CASES, indirect=["full_unet"], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("method", TYPES)
def test_presets_grow_strictly_from_small_to_highest(full_unet, family_name, family, method):
    presets = TYPES[method].presets[family_name]
    assert list(presets) == ORDER
    computed = [fp16_file_mb(full_unet, presets[n], family, method) for n in ORDER]
    advertised = [presets[n].file_mb for n in ORDER]
    assert all(a < b for a, b in zip(computed, computed[1:])), computed
    assert all(a < b for a, b in zip(advertised, advertised[1:])), advertised


def test_family_defaults_and_presets_fill_what_the_user_leaves_out(tmp_path):
    xl = TrainSettings.defaults_for("sdxl")
    assert (xl.resolution, xl.batch_size, xl.dim, xl.conv_dim) == (1024, 1, 16, 8)
    assert TrainSettings.defaults_for("sd1") == TrainSettings()
    given = {"dataset_dir": str(tmp_path), "network_preset": "high", "learning_rate": 2e-4}
    from_json = TrainSettings.from_dict(given, family="sdxl")
    assert (from_json.dim, from_json.conv_dim, from_json.network_preset) == (8, 4, "high")
    assert from_json.resolution == FAMILY_DEFAULTS["sdxl"]["resolution"] and from_json.learning_rate == 2e-4
    assert TrainSettings.from_dict(given).dim == TYPES["loha"].presets["sd1"]["high"].dim == 16


def test_each_method_starts_from_its_own_defaults(tmp_path):
    lora = TrainSettings.from_dict({"dataset_dir": str(tmp_path), "training_method": "lora"})
    assert (lora.learning_rate, lora.dim, lora.conv_dim) == (1e-4, 64, 0)
    lokr = TrainSettings.from_dict({"dataset_dir": str(tmp_path), "training_method": "lokr",
                                    "network_preset": "small"}, family="sdxl")
    assert (lokr.learning_rate, lokr.lokr_factor, lokr.network_preset) == (5e-4, 16, "small")
    custom = TrainSettings.from_dict({"dataset_dir": str(tmp_path), "training_method": "lokr", "lokr_factor": 6})
    assert custom.network_preset == "custom"


@pytest.mark.parametrize("family,resolution,sides", [("sdxl", 256, (128, 512)), ("sd1", 1536, (768, 3072)),
                                                     ("sd1", 128, (64, 256))])
def test_bucket_sides_left_out_follow_the_resolution_given(family, resolution, sides):
    """An SDXL model at 256 px was refused for bucket sides the user never set (SDXL's 512–2048)."""
    s = TrainSettings.from_dict({"name": "x", "dataset_dir": "d", "resolution": resolution}, family=family)
    assert (s.bucket_min_side, s.bucket_max_side) == sides
    kept = TrainSettings.from_dict({"name": "x", "dataset_dir": "d", "resolution": 256, "bucket_max_side": 320},
                                   family=family)
    assert (kept.bucket_min_side, kept.bucket_max_side) == (128, 320)
