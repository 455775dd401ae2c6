"""What is SDXL's own, on a tiny SDXL-shaped model: two text encoders, the "vector" conditioning with each image's own
size and crop. It is told apart bare or in the host's wrappers, each image trains with its own sizes and caption, the
file says SDXL, and checkpoints that cannot be trained are refused by name. (What every family does:
tests/test_engine.py.)

The model is `lohatrain.demo_sdxl`'s tiny build of `lohatrain.sgm_standin`, the stand-in for sgm's DiffusionEngine:
sgm (Stability-AI/generative-models) is not on the package registries, so its SDXL UNet, conditioner and embedders
are rebuilt from ldm's blocks following sgm's code (see that module's docstring).
"""
from __future__ import annotations

import dataclasses

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lohatrain.families import ldm_parts
from lohatrain.demo import build_tiny_sd1, build_tiny_sd2
from lohatrain.demo_sdxl import build_tiny_sdxl
from lohatrain.errors import LohatrainError
from lohatrain.families import detect
from lohatrain.families.sdxl import SDXL
from lohatrain.sgm_standin import ConcatTimestepEmbedderND
from lohatrain.trainer import train

from runs import image_sizes, model_state, sdxl_conditioning as conditioning, settings_for

CLIP_L_WIDTH, BIGG_WIDTH = 32, 48  # the tiny text encoders' widths (SDXL: 768 and 1280)


def test_sdxl_is_detected_bare_or_in_the_hosts_wrappers(sdxl_model):
    assert detect(sdxl_model) is SDXL
    bare_layers = [key for key, _ in SDXL.text_layers(SDXL.text_encoder(sdxl_model))]
    for i in (0, 1):  # the host wraps each text embedder and keeps sgm's in `.wrapped`
        wrapper = nn.Module()
        wrapper.wrapped, wrapper.input_key, wrapper.is_trainable = sdxl_model.conditioner.embedders[i], "txt", False
        sdxl_model.conditioner.embedders[i] = wrapper
    assert detect(sdxl_model) is SDXL
    assert [key for key, _ in SDXL.text_layers(SDXL.text_encoder(sdxl_model))] == bare_layers
    assert {key.split("_text_model")[0] for key in bare_layers} == {"lora_te1", "lora_te2"}


def _refiner():
    model = build_tiny_sdxl(0)
    aesthetic = ConcatTimestepEmbedderND(16, "aesthetic_score")
    model.conditioner.embedders = nn.ModuleList([model.conditioner.embedders[1], *model.conditioner.embedders[2:],
                                                 aesthetic])
    return model


def _with_unet_inputs(channels):
    def build():
        model = build_tiny_sd1(0)
        model.model.diffusion_model.in_channels = channels
        return model
    return build


def _flagged(**flags):
    def build():
        model = build_tiny_sd2(0)
        model.__dict__.update(flags)
        return model
    return build


@pytest.mark.parametrize("build,named", [
    (_refiner, "the SDXL refiner"),
    (_with_unet_inputs(9), "an inpainting checkpoint"),
    (_with_unet_inputs(8), "an instruct-pix2pix checkpoint"),
    (_with_unet_inputs(5), "a depth-conditioned SD 2 checkpoint"),
    (_flagged(is_sd2=False, is_sd3=True), "Stable Diffusion 3"),
    (_flagged(is_sd2=False, is_sdxl=True), r"a model of a kind it does not know, SDXL \(LatentDiffusion\)"),
], ids=["refiner", "inpainting", "pix2pix", "depth", "sd3", "unknown"])
def test_checkpoints_it_cannot_train_are_refused_by_name(build, named, sample_dataset, tmp_path):
    model = build()
    before = model_state(model)
    with pytest.raises(LohatrainError, match=f"cannot train on the loaded model: it is {named}.*SDXL base"):
        train(ldm_parts(model), settings_for(sample_dataset, tmp_path / "out", steps=2))
    assert not (tmp_path / "out").exists() and model_state(model) == before


def test_each_images_own_size_and_crop_reach_the_unet(sdxl_model, sample_dataset, tmp_path):
    """The vector the UNet gets holds the image's original size, its crop (mirrored when flipped) and the
    bucket, embedded as the conditioner embeds them; not the 1024x1024 / no-crop of a generation."""
    vectors = []
    unet_forward = sdxl_model.model.forward

    def record(x, t, c, **kwargs):
        vectors.append(c["vector"].detach().clone())
        return unet_forward(x, t, c, **kwargs)

    sdxl_model.model.forward = record
    s = settings_for(sample_dataset, tmp_path, steps=12, batch_size=1, flip_aug=True)
    train(ldm_parts(sdxl_model), s)
    expected = []
    for caption, (h, w, top, left, th, tw) in image_sizes(sample_dataset).items():
        resized_w = round(w * max(64 / w, 64 / h))
        for crop_left in {left, resized_w - left - 64}:
            expected.append(conditioning(sdxl_model, [caption], [(h, w, top, crop_left, th, tw)])["vector"][0])
    assert len(vectors) == 12
    for vector in vectors:
        assert any(torch.allclose(vector[0], e, atol=1e-5) for e in expected)
    assert any(v[0, BIGG_WIDTH:].ne(vectors[0][0, BIGG_WIDTH:]).any() for v in vectors)  # sizes differ
    assert len({(h, w) for h, w, *_ in image_sizes(sample_dataset).values()}) > 1


def test_every_image_trains_with_its_captions_own_encoding(sdxl_model, sample_dataset, tmp_path):
    """Captions go through the conditioner several to a pass, yet each image's step gets what its caption gives
    encoded alone: both encoders' tokens and the pooled vector (each image found by its own sizes)."""
    conds = []
    unet_forward = sdxl_model.model.forward

    def record(x, t, c, **kwargs):
        conds.append({k: v.detach().clone() for k, v in c.items()})
        return unet_forward(x, t, c, **kwargs)

    sdxl_model.model.forward = record
    train(ldm_parts(sdxl_model), settings_for(sample_dataset, tmp_path, steps=8, batch_size=1))  # one epoch, one bucket
    with torch.no_grad():
        alone = {caption: conditioning(sdxl_model, [caption], [size])
                 for caption, size in image_sizes(sample_dataset).items()}
    trained = []
    for c in conds:
        sizes = c["vector"][0, BIGG_WIDTH:]
        caption, = (k for k, e in alone.items() if torch.equal(sizes, e["vector"][0, BIGG_WIDTH:]))
        for key in ("crossattn", "vector"):
            torch.testing.assert_close(c[key], alone[caption][key], rtol=1e-5, atol=1e-6)
        trained.append(caption)
    assert sorted(trained) == sorted(alone)


def test_metadata_marks_sdxl(sdxl_model, sample_dataset, tmp_path):
    result = train(dataclasses.replace(ldm_parts(sdxl_model), name="tiny-xl.safetensors"), settings_for(sample_dataset, tmp_path, steps=1, clip_skip=2))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    # The host's Lora tab: a base version starting with "sdxl_" = SDXL (shown on SDXL models).
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_v2"] == "False"
    assert meta["ss_clip_skip"] == "None"  # the host ignores CLIP skip on SDXL
    assert json.loads((tmp_path / "test-loha.json").read_text())["sd version"] == "SDXL"


def test_command_line_demo_trains_the_tiny_sdxl_model(tmp_path, capsys):
    from lohatrain.__main__ import main

    assert main(["train", "--demo", "--family", "sdxl", "--output-dir", str(tmp_path), "--steps", "3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    with safe_open(tmp_path / "demo-loha.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
        assert f.metadata()["ss_sd_model_name"] == "lohatrain-tiny-sdxl-demo"
