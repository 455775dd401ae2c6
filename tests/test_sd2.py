"""The engine on a tiny real ldm SD2 model (v-prediction, OpenCLIP text encoder with fused attention): the
loss goes down, files load under the host's SD2 rules and reproduce the trained output, runs repeat, the
file says SD2, the model is left exactly as found, and the zero-terminal-SNR schedule does what it says."""
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
from lohatrain.demo import build_tiny_sd1, build_tiny_sd2
from lohatrain.errors import LohatrainError
from lohatrain.families import detect
from lohatrain.families.sd1 import SD1
from lohatrain.families.sd2 import SD2
from lohatrain.network import Network, plan_fused_attention
from lohatrain.settings import TrainSettings
from lohatrain.loop import rescale_zero_terminal_snr
from lohatrain.trainer import Hooks, train

from host_rules import apply_file
from test_engine import denoising_loss, expected_unet_targets, model_state, modules_the_host_loads, settings_for



@pytest.fixture(scope="module")
def _sd2_template():
    return build_tiny_sd2(0)


@pytest.fixture
def sd2_model(_sd2_template):
    """A fresh `build_tiny_sd2(0)` (768-v layout, v-prediction) per test."""
    return copy.deepcopy(_sd2_template)


def test_tiny_sd2_has_the_hosts_sd2_shape(sd2_model):
    stage = sd2_model.cond_stage_model
    assert (sd2_model.is_sd1, sd2_model.is_sd2, sd2_model.is_sdxl) == (False, True, False)
    assert sd2_model.parameterization == "v" and sd2_model.scale_factor == 0.18215
    assert build_tiny_sd2(0, v_prediction=False).parameterization == "eps"
    assert (stage.layer, stage.layer_idx) == ("penultimate", 1)
    block = stage.model.transformer.resblocks[0]
    assert isinstance(block.attn, nn.MultiheadAttention) and block.attn._qkv_same_embed_dim
    assert isinstance(block.mlp.c_fc, nn.Linear) and isinstance(block.mlp.c_proj, nn.Linear)
    assert isinstance(sd2_model.model.diffusion_model.input_blocks[1][1].proj_in, nn.Linear)  # linear proj
    tokens = stage.tokenize(["a photo of a cat"])[0]
    assert tokens[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and not tokens[7:].any()
    with torch.no_grad():
        cond = sd2_model.get_learned_conditioning(["red circle", ""])
    assert cond.shape == (2, 77, stage.model.ln_final.normalized_shape[0])
    assert not torch.allclose(cond[0], cond[1]) and cond[1].mean().abs() > 0.01


def test_sd2_is_detected_with_or_without_the_hosts_flag(sd2_model):
    assert detect(sd2_model) is SD2
    del sd2_model.is_sd2, sd2_model.is_sd1  # a plain ldm model: the OpenCLIP cond stage decides
    assert detect(sd2_model) is SD2
    wrapper = nn.Module()  # the host's FrozenOpenCLIPEmbedderWithCustomWords keeps ldm's embedder in .wrapped
    wrapper.wrapped = sd2_model.cond_stage_model
    sd2_model.cond_stage_model = wrapper
    assert SD2.text_encoder(sd2_model) is wrapper.wrapped.model
    assert detect(build_tiny_sd1(0)) is SD1


def test_training_lowers_the_v_loss_and_the_file_carries_it(sd2_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(sd2_model)
    before = denoising_loss(fresh, sample_dataset)
    result = train(ldm_parts(sd2_model), settings_for(sample_dataset, tmp_path, steps=40, learning_rate=1e-2))
    assert apply_file(fresh, load_file(result.file)) == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.9 * before, (before, after)


def test_applying_the_file_reproduces_the_trained_models_output(sd2_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(sd2_model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    seen = {}

    def capture(step, network):
        if step == 5:
            seen["cond"] = sd2_model.get_learned_conditioning(["blue circle"])
            seen["out"] = sd2_model.apply_model(x, t, seen["cond"])

    s = settings_for(sample_dataset, tmp_path, steps=5, learning_rate=1e-2, text_encoder_lr=1e-2, conv_dim=2,
                     conv_alpha=1)
    train(ldm_parts(sd2_model), s, Hooks(on_step=capture))
    with torch.no_grad():
        base_cond = fresh.get_learned_conditioning(["blue circle"])
        base_out = fresh.apply_model(x, t, base_cond)
    assert apply_file(fresh, load_file(tmp_path / "test-loha.safetensors")) == []
    with torch.no_grad():
        file_cond = fresh.get_learned_conditioning(["blue circle"])
        file_out = fresh.apply_model(x, t, file_cond)
    assert not torch.allclose(base_cond, seen["cond"], atol=1e-3)  # the text encoder's LoHa changed it
    assert not torch.allclose(base_out, seen["out"], atol=1e-4)
    torch.testing.assert_close(file_cond, seen["cond"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(file_out, seen["out"], atol=2e-5, rtol=1e-4)


def _expected_targets(model, conv: bool, text: bool) -> set[int]:
    """Modules a LoHa must change, enumerated independently of lohatrain's planner (for the text encoder:
    each fused attention and its out_proj, and both MLP Linears of every residual block)."""
    expected = expected_unet_targets(model.model.diffusion_model, conv)
    if text:
        for m in model.cond_stage_model.model.modules():
            if isinstance(m, nn.MultiheadAttention):
                expected |= {id(m), id(m.out_proj)}
            elif isinstance(m, nn.Linear) and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear):
                expected.add(id(m))
    return expected


@pytest.mark.parametrize("conv,text", [(False, False), (True, True)])
def test_every_key_matches_a_module_under_the_hosts_sd2_rules(sd2_model, sample_dataset, tmp_path, conv, text):
    s = settings_for(sample_dataset, tmp_path, steps=1, conv_dim=4 if conv else 0, conv_alpha=2,
                     text_encoder_lr=1e-4 if text else 0.0)
    tensors = load_file(train(ldm_parts(sd2_model), s).file)
    covered, attention_parts = modules_the_host_loads(sd2_model, tensors)
    assert covered == _expected_targets(sd2_model, conv, text)
    # The host applies a fused attention's LoHa only when q, k, v (and out) are all there.
    assert all(parts == {"q", "k", "v"} for parts in attention_parts.values())
    assert len(attention_parts) == (len(sd2_model.cond_stage_model.model.transformer.resblocks) if text else 0)
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_proj_in.") for k in tensors)  # SD1's naming
    for name in ("self_attn_q_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"):
        assert any(k.startswith(f"lora_te_text_model_encoder_layers_0_{name}.") for k in tensors) == text


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(sd2_model, sample_dataset, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    files = []
    for i, seed in enumerate((11, 11, 12)):
        s = settings_for(sample_dataset, tmp_path / str(i), seed=seed, steps=3, text_encoder_lr=1e-3,
                         min_snr_gamma=5.0)
        files.append(train(ldm_parts(copy.deepcopy(sd2_model)), s).file.read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


@pytest.mark.parametrize("v_prediction", [True, False])
def test_metadata_marks_sd2(sample_dataset, tmp_path, v_prediction):
    model = build_tiny_sd2(0, v_prediction=v_prediction)
    result = train(dataclasses.replace(ldm_parts(model), name="tiny-v2.safetensors"), settings_for(sample_dataset, tmp_path, steps=1, clip_skip=2))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    # The host's Lora tab: ss_v2 "True" = SD2 (shown on SD2 models); kohya's base version and v flag.
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["ss_v_parameterization"] == str(v_prediction)
    assert meta["ss_clip_skip"] == "None"  # the host encodes SD2 prompts ignoring its CLIP-skip option
    assert meta["ss_zero_terminal_snr"] == "False"
    assert json.loads((tmp_path / "test-loha.json").read_text())["sd version"] == "SD2"


@pytest.mark.parametrize("ending", ["done", "error"])
def test_model_is_left_exactly_as_found(sd2_model, sample_dataset, tmp_path, ending):
    before = model_state(sd2_model)
    s = settings_for(sample_dataset, tmp_path, steps=3, gradient_checkpointing=True, text_encoder_lr=1e-3,
                     conv_dim=2, conv_alpha=1, zero_terminal_snr=True)

    def on_step(step, network):
        if ending == "error" and step == 2:
            raise RuntimeError("boom")

    if ending == "done":
        assert train(ldm_parts(sd2_model), s, Hooks(on_step=on_step)).status == "done"
    else:
        with pytest.raises(RuntimeError, match="boom"):
            train(ldm_parts(sd2_model), s, Hooks(on_step=on_step))
    assert model_state(sd2_model) == before


def test_zero_terminal_snr_schedule():
    ac = build_tiny_sd2(0).alphas_cumprod.double()
    rescaled = rescale_zero_terminal_snr(ac)
    assert rescaled[-1] == 0 and torch.isclose(rescaled[0], ac[0], rtol=0, atol=1e-15)
    assert (rescaled[1:] < rescaled[:-1]).all()
    # sqrt(ᾱ) is an affine map of the original's: shifted to 0 at the end, first value kept.
    a, b = ac.sqrt(), rescaled.sqrt()
    torch.testing.assert_close(b, (a - a[-1]) * a[0] / (a[0] - a[-1]))


def test_zero_terminal_snr_changes_the_run_and_leaves_the_schedule(sd2_model, sample_dataset, tmp_path):
    schedule = sd2_model.alphas_cumprod.clone()
    plain = train(ldm_parts(copy.deepcopy(sd2_model)), settings_for(sample_dataset, tmp_path / "a", steps=3))
    zsnr = train(ldm_parts(sd2_model), settings_for(sample_dataset, tmp_path / "b", steps=3, zero_terminal_snr=True))
    assert plain.losses != zsnr.losses
    a, b = load_file(plain.file), load_file(zsnr.file)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(sd2_model.alphas_cumprod, schedule)
    with safe_open(zsnr.file, "pt") as f:
        assert f.metadata()["ss_zero_terminal_snr"] == "True"


def test_training_uses_the_checkpoints_schedule_not_the_hosts_sampling_copy(sd2_model, sample_dataset, tmp_path):
    """The host keeps the checkpoint's schedule in `alphas_cumprod_original` and rewrites `alphas_cumprod`
    before sampling when its "Zero Terminal SNR" noise-schedule option is on."""
    plain = train(ldm_parts(copy.deepcopy(sd2_model)), settings_for(sample_dataset, tmp_path / "a", steps=2))
    sd2_model.alphas_cumprod_original = sd2_model.alphas_cumprod
    sd2_model.alphas_cumprod = rescale_zero_terminal_snr(sd2_model.alphas_cumprod.double()).float()
    hosted = train(ldm_parts(sd2_model), settings_for(sample_dataset, tmp_path / "b", steps=2))
    assert hosted.losses == plain.losses


@pytest.mark.parametrize("build", [lambda: build_tiny_sd2(0, v_prediction=False), lambda: build_tiny_sd1(0)])
def test_zero_terminal_snr_is_refused_on_eps_models(build, sample_dataset, tmp_path):
    model = build()
    before = model_state(model)
    with pytest.raises(LohatrainError, match="zero_terminal_snr needs a v-prediction model"):
        train(ldm_parts(model), settings_for(sample_dataset, tmp_path / "out", steps=2, zero_terminal_snr=True))
    assert not (tmp_path / "out").exists() and model_state(model) == before


def test_zero_terminal_snr_must_be_a_bool(sample_dataset):
    problems = TrainSettings(dataset_dir=str(sample_dataset), zero_terminal_snr="yes").problems()
    assert problems == ['zero_terminal_snr must be true or false, not "yes"']


@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_attention_runs_with_its_weights_plus_each_projections_delta(batch_first):
    """The merged forward equals torch's own attention with in_proj_weight + cat(ΔWq, ΔWk, ΔWv) and
    out_proj.weight + ΔWout; ΔW from each projection's LoHa."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    plans = plan_fused_attention("lora_te_x_self_attn", attention, dim=4, alpha=2)
    assert [p.key for p in plans] == [f"lora_te_x_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    assert all(p.module.weight.device.type == "meta" and p.module.weight.shape == (16, 16) for p in plans)
    network = Network(plans, seed=3)
    with torch.no_grad():
        for lora in network.adapters:
            lora.hada_w2_a.normal_(std=0.1)  # lycoris starts with ΔW = 0
    expected = copy.deepcopy(attention)
    with torch.no_grad():
        deltas = [lora.delta() for lora in network.adapters]
        expected.in_proj_weight += torch.cat(deltas[:3])
        expected.out_proj.weight += deltas[3]
    x = torch.randn(5, 2, 16) if not batch_first else torch.randn(2, 5, 16)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    network.attach()
    try:
        got = attention(x, x, x, need_weights=False, attn_mask=mask)[0]
        got.sum().backward()
    finally:
        network.detach()
    assert "forward" not in attention.__dict__
    with torch.no_grad():
        want = expected(x, x, x, need_weights=False, attn_mask=mask)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert all(lora.hada_w1_a.grad is not None and lora.hada_w1_a.grad.any() for lora in network.adapters)
