"""The engine on a tiny SDXL-shaped model: two text encoders, the "vector" conditioning with each image's own
size and crop, the ldm-named 3-level UNet. The loss goes down, files load under the host's SDXL rules and
reproduce the trained output, runs repeat, the file says SDXL, the model is left exactly as found; and
checkpoints that cannot be trained are refused by name.

The model is `lohatrain.demo_sdxl`'s tiny build of `lohatrain.sgm_standin`, the stand-in for sgm's DiffusionEngine:
sgm (Stability-AI/generative-models) is not on the package registries, so its SDXL UNet, conditioner and embedders
are rebuilt from ldm's blocks following sgm's code (see that module's docstring).
"""
from __future__ import annotations

import dataclasses

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lohatrain.families import ldm_parts
from lohatrain import dataset as ds
from lohatrain.demo import build_tiny_sd1, build_tiny_sd2
from lohatrain.demo_sdxl import build_tiny_sdxl
from lohatrain.errors import LohatrainError
from lohatrain.families import detect
from lohatrain.families.sdxl import SDXL
from lohatrain.sgm_standin import SIZE_KEYS, ConcatTimestepEmbedderND
from lohatrain.trainer import Hooks, train

from host_rules import apply_file
from test_engine import expected_unet_targets, model_state, modules_the_host_loads, settings_for

CLIP_L_WIDTH, BIGG_WIDTH = 32, 48  # the tiny text encoders' widths (SDXL: 768 and 1280)


@pytest.fixture(scope="module")
def _sdxl_template():
    return build_tiny_sdxl(0)


@pytest.fixture
def sdxl_model(_sdxl_template):
    """A fresh `build_tiny_sdxl(0)` per test."""
    return copy.deepcopy(_sdxl_template)


def conditioning(model, captions: list[str], sizes: list[tuple[int, ...]]) -> dict:
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
def denoising_loss(model, dataset, seed: int = 0) -> float:
    """Mean noise-prediction error over the dataset's images at fixed noise and timesteps."""
    gen = torch.Generator().manual_seed(seed)
    sizes = image_sizes(dataset)
    total, count = 0.0, 0
    for item in ds.scan_dataset(dataset, "txt"):
        pixels, _ = ds.prepare_image(ds.load_image(item.path), (64, 64))
        latent = model.encode_first_stage(pixels[None])
        cond = conditioning(model, [item.caption], [sizes[item.caption]])
        for t in (100, 400, 700):
            noise = torch.randn(latent.shape, generator=gen)
            ac = model.alphas_cumprod[t]
            noisy = ac.sqrt() * latent + (1 - ac).sqrt() * noise
            total += torch.mean((model.model(noisy, torch.tensor([t]), cond) - noise) ** 2).item()
            count += 1
    return total / count


def test_tiny_sdxl_has_sdxls_shape(sdxl_model):
    unet = sdxl_model.model.diffusion_model
    assert (len(unet.input_blocks), len(unet.output_blocks)) == (9, 9)
    attention = sorted(name for name, m in unet.named_modules() if type(m).__name__ == "SpatialTransformer")
    assert attention == sorted([f"input_blocks.{i}.1" for i in (4, 5, 7, 8)] + ["middle_block.1"]
                               + [f"output_blocks.{i}.1" for i in range(6)])
    assert isinstance(unet.input_blocks[4][1].proj_in, nn.Linear)
    assert [type(m).__name__ for m in unet.label_emb[0]] == ["Linear", "SiLU", "Linear"]
    assert len(unet.input_blocks[7][1].transformer_blocks) == 2 > len(unet.input_blocks[4][1].transformer_blocks)
    assert sdxl_model.scale_factor == 0.13025 and sdxl_model.parameterization == "eps"
    assert sdxl_model.is_sdxl and not (sdxl_model.is_sd1 or sdxl_model.is_sd2)
    cond = conditioning(sdxl_model, ["red circle", ""], [(1024, 1024, 0, 0, 1024, 1024)] * 2)
    size_width = 6 * sdxl_model.conditioner.embedders[2].outdim
    assert cond["crossattn"].shape == (2, 77, CLIP_L_WIDTH + BIGG_WIDTH)
    assert cond["vector"].shape == (2, BIGG_WIDTH + size_width) == (2, unet.label_emb[0][0].in_features)
    assert not torch.allclose(cond["crossattn"][0], cond["crossattn"][1])
    other = conditioning(sdxl_model, ["red circle"], [(512, 768, 10, 0, 1024, 1024)])
    torch.testing.assert_close(other["vector"][0, :BIGG_WIDTH], cond["vector"][0, :BIGG_WIDTH])  # pooled text
    assert not torch.allclose(other["vector"][0, BIGG_WIDTH:], cond["vector"][0, BIGG_WIDTH:])  # the sizes


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


def test_training_lowers_the_loss_and_the_file_carries_it(sdxl_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(sdxl_model)
    before = denoising_loss(fresh, sample_dataset)
    # With conv layers, as the default preset: SDXL has no attention on its full-resolution level, and in a
    # tiny random model a few dozen steps of attention-only LoHa barely move the loss.
    result = train(ldm_parts(sdxl_model), settings_for(sample_dataset, tmp_path, steps=15, learning_rate=1e-2, conv_dim=4,
                                            conv_alpha=2))
    assert apply_file(fresh, load_file(result.file)) == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.9 * before, (before, after)


def test_applying_the_file_reproduces_the_trained_models_output(sdxl_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(sdxl_model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    sizes = [(96, 160, 0, 21, 64, 64)]
    seen = {}

    def capture(step, network):
        if step == 4:
            seen["cond"] = conditioning(sdxl_model, ["blue circle"], sizes)
            seen["out"] = sdxl_model.model(x, t, seen["cond"])

    s = settings_for(sample_dataset, tmp_path, steps=4, learning_rate=1e-2, text_encoder_lr=1e-2, conv_dim=2,
                     conv_alpha=1)
    train(ldm_parts(sdxl_model), s, Hooks(on_step=capture))
    with torch.no_grad():
        base_cond = conditioning(fresh, ["blue circle"], sizes)
        base_out = fresh.model(x, t, base_cond)
    assert apply_file(fresh, load_file(tmp_path / "test-loha.safetensors")) == []
    with torch.no_grad():
        file_cond = conditioning(fresh, ["blue circle"], sizes)
        file_out = fresh.model(x, t, file_cond)
    # Both text encoders' LoHa changed the conditioning: CLIP-L's and bigG's halves of crossattn, bigG's pooled.
    changed = seen["cond"]["crossattn"] - base_cond["crossattn"]
    assert changed[..., :CLIP_L_WIDTH].abs().max() > 1e-3 and changed[..., CLIP_L_WIDTH:].abs().max() > 1e-3
    assert not torch.allclose(base_cond["vector"][:, :BIGG_WIDTH], seen["cond"]["vector"][:, :BIGG_WIDTH])
    assert not torch.allclose(base_out, seen["out"], atol=1e-4)
    for key in ("crossattn", "vector"):
        torch.testing.assert_close(file_cond[key], seen["cond"][key], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(file_out, seen["out"], atol=2e-5, rtol=1e-4)


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


def _expected_targets(model, conv: bool, text: bool) -> set[int]:
    """Modules a LoHa must change, enumerated independently of lohatrain's planner: the UNet's attention
    Linears (and with conv, its ResBlock/Down/Upsample layers), CLIP-L's attention and MLP Linears, and each
    bigG block's fused attention (with its out_proj) and MLP Linears."""
    expected = expected_unet_targets(model.model.diffusion_model, conv)
    if text:
        clip_l, bigg = model.conditioner.embedders[0], model.conditioner.embedders[1]
        for layer in clip_l.transformer.text_model.encoder.layers:
            expected |= {id(m) for m in layer.modules() if isinstance(m, nn.Linear)}
        for block in bigg.model.transformer.resblocks:
            expected |= {id(block.attn), id(block.attn.out_proj), id(block.mlp.c_fc), id(block.mlp.c_proj)}
    return expected


@pytest.mark.parametrize("conv,text", [(False, False), (True, True)])
def test_every_key_matches_a_module_under_the_hosts_sdxl_rules(sdxl_model, sample_dataset, tmp_path, conv, text):
    s = settings_for(sample_dataset, tmp_path, steps=1, conv_dim=4 if conv else 0, conv_alpha=2,
                     text_encoder_lr=1e-4 if text else 0.0)
    tensors = load_file(train(ldm_parts(sdxl_model), s).file)
    covered, attention_parts = modules_the_host_loads(sdxl_model, tensors)
    assert covered == _expected_targets(sdxl_model, conv, text)
    assert all(parts == {"q", "k", "v"} for parts in attention_parts.values())  # complete sets only
    assert len(attention_parts) == (len(sdxl_model.conditioner.embedders[1].model.transformer.resblocks)
                                    if text else 0)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in tensors)
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in tensors)  # SD1 names miss


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(sdxl_model, sample_dataset, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    files = []
    for i, seed in enumerate((11, 11, 12)):
        s = settings_for(sample_dataset, tmp_path / str(i), seed=seed, steps=3, text_encoder_lr=1e-3,
                         flip_aug=True)
        files.append(train(ldm_parts(copy.deepcopy(sdxl_model)), s).file.read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_metadata_marks_sdxl(sdxl_model, sample_dataset, tmp_path):
    result = train(dataclasses.replace(ldm_parts(sdxl_model), name="tiny-xl.safetensors"), settings_for(sample_dataset, tmp_path, steps=1, clip_skip=2))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    # The host's Lora tab: a base version starting with "sdxl_" = SDXL (shown on SDXL models).
    assert meta["ss_base_model_version"].startswith("sdxl_") and meta["ss_v2"] == "False"
    assert meta["ss_clip_skip"] == "None"  # the host ignores CLIP skip on SDXL
    assert json.loads((tmp_path / "test-loha.json").read_text())["sd version"] == "SDXL"


@pytest.mark.parametrize("ending", ["done", "error"])
def test_model_is_left_exactly_as_found(sdxl_model, sample_dataset, tmp_path, ending):
    before = model_state(sdxl_model)
    trainable = [e.is_trainable for e in sdxl_model.conditioner.embedders]
    s = settings_for(sample_dataset, tmp_path, steps=3, gradient_checkpointing=True, text_encoder_lr=1e-3,
                     conv_dim=2, conv_alpha=1)

    def on_step(step, network):
        if ending == "error" and step == 2:
            raise RuntimeError("boom")

    if ending == "done":
        assert train(ldm_parts(sdxl_model), s, Hooks(on_step=on_step)).status == "done"
    else:
        with pytest.raises(RuntimeError, match="boom"):
            train(ldm_parts(sdxl_model), s, Hooks(on_step=on_step))
    assert model_state(sdxl_model) == before
    assert [e.is_trainable for e in sdxl_model.conditioner.embedders] == trainable


def test_command_line_demo_trains_the_tiny_sdxl_model(tmp_path, capsys):
    from lohatrain.__main__ import main

    assert main(["train", "--demo", "--family", "sdxl", "--output-dir", str(tmp_path), "--steps", "3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    with safe_open(tmp_path / "demo-loha.safetensors", "pt") as f:
        assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
        assert f.metadata()["ss_sd_model_name"] == "lohatrain-tiny-sdxl-demo"
