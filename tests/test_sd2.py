"""What is SD2's own, on a tiny real ldm SD2 model (v-prediction, OpenCLIP text encoder with fused attention): it is
told apart with or without the host's flag, the file says SD2, the zero-terminal-SNR schedule does what it says, and
a fused attention trains as its four projections. (What every family does: tests/test_engine.py.)"""
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
from lohatrain.trainer import train

from runs import model_state, settings_for



def test_sd2_is_detected_with_or_without_the_hosts_flag(sd2_model):
    assert detect(sd2_model) is SD2
    del sd2_model.is_sd2, sd2_model.is_sd1  # a plain ldm model: the OpenCLIP cond stage decides
    assert detect(sd2_model) is SD2
    wrapper = nn.Module()  # the host's FrozenOpenCLIPEmbedderWithCustomWords keeps ldm's embedder in .wrapped
    wrapper.wrapped = sd2_model.cond_stage_model
    sd2_model.cond_stage_model = wrapper
    assert SD2.text_encoder(sd2_model) is wrapper.wrapped.model
    assert detect(build_tiny_sd1(0)) is SD1


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
