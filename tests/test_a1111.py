"""lohatrain in the A1111 WebUI (v1.10.1), on its stand-in (tests/webui_stub): a file trained on the loaded model of
each family applies through the host's own Lora extension for every network type (every key matched, the image
changes, the weights are what an independent reading of the host's rules gives); a run on
the loaded SD2 or SDXL checkpoint goes through the host's own conditioning and txt2img and leaves the model exactly
as found; the user's text-encoder LoRA from the last generation changes nothing in a run."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import host_rules
from a1111 import generate, loaded, loaded_family, pixels
from runs import model_state, settings_for
from users_loras import text_encoder_lora

import networks
from modules import shared

from lohatrain.families import ldm_parts
from lohatrain.trainer import train


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained_file_through_the_host(model, webui, sample_dataset, name: str, **settings) -> tuple[dict, list[str]]:
    """Train a small network (LoHa unless `settings` say otherwise; UNet with conv layers, and the text encoders)
    on the loaded model and generate with it as the host does. Checked for every family and type: training leaves
    the weights as they were, every key lands, the image changes, the weights carry what an independent reading
    of the host's rules adds. Returns the file's tensors and the names of the
    weights the file changed."""
    pure = _weights(model)
    plain = generate("red circle")
    settings = settings_for(sample_dataset, webui / "Lora", **{
        "name": name, "steps": 2, "learning_rate": 1e-2, "text_encoder_lr": 1e-2, "conv_dim": 2, "conv_alpha": 1,
        **settings})
    result = train(ldm_parts(model), settings)
    assert _weights(model).keys() == pure.keys() and all(torch.equal(v, pure[k]) for k, v in _weights(model).items())
    tensors = load_file(result.file)

    networks.list_available_networks()
    with_network = generate(f"red circle <lora:{name}:1>")
    assert networks.last_unmatched_keys == [] and [n.name for n in networks.loaded_networks] == [name]
    assert not networks.extra_network_lora.errors
    assert not np.array_equal(pixels(plain), pixels(with_network))

    expected = copy.deepcopy(model)
    expected.load_state_dict(pure)
    assert host_rules.apply_file(expected, tensors) == []
    applied, wanted = _weights(model), _weights(expected)
    changed = [k for k in pure if not torch.equal(applied[k], pure[k])]
    for key in pure:
        torch.testing.assert_close(applied[key], wanted[key], rtol=1e-5, atol=1e-6, msg=key)
    return tensors, changed


SUFFIXES = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"}, "locon": {"lora_down.weight", "lora_up.weight",
            "alpha"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}
SD2_TEXT = "cond_stage_model.wrapped.model.transformer.resblocks."
# Every module type of the host's loader on SD1 (plain LoRA's keys are LoRA+DoRA's less `dora_scale`; LoCon's are
# LoRA's on more layers); on SD2 LoHa (OpenCLIP's fused attention); on SDXL (other block names, both text encoders)
# LoHa, LoRA with DoRA's scales and LoKr.
CASES = [("sd1", "locon", False), ("sd1", "lokr", False), ("sd1", "lora", True), ("sd1", "loha", True),
         ("sd2", "loha", False), ("sdxl", "loha", False), ("sdxl", "lora", True), ("sdxl", "lokr", False)]


@pytest.mark.parametrize("family,method,dora", CASES, ids=[f"{f}-{m}{'+dora' if d else ''}" for f, m, d in CASES])
def test_every_type_and_family_applies_through_the_hosts_loader(webui, sample_dataset, family, method, dora):
    """The host's own module types (network_lora.py, network_hada.py, network_lokr.py, network.py's DoRA) and key
    rules per family: SD1's and SD2's diffusers-named `lora_unet_`/`lora_te_` (SD2's mapped onto OpenCLIP's
    resblocks with the fused attention), SDXL's ldm names with `lora_te1_` on CLIP-L and `lora_te2_` on bigG."""
    model = loaded_family(webui, family)
    tensors, changed = trained_file_through_the_host(
        model, webui, sample_dataset, f"{family}_{method}{'_dora' if dora else ''}", training_method=method,
        dora=dora, lokr_factor=4, conv_dim=0 if method == "lora" else 2)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    if method in SUFFIXES:
        assert suffixes == SUFFIXES[method] | ({"dora_scale"} if dora else set())
    else:
        assert {"lokr_w1", "alpha"} <= suffixes <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    conv_changed = any(k.endswith("in_layers.2.weight") for k in changed)  # a ResBlock's 3x3 conv
    assert conv_changed == (method != "lora")
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == ({"unet", "te1", "te2"} if family == "sdxl" else {"unet", "te"}), prefixes
    if family == "sd2":
        assert networks.available_networks[f"sd2_{method}"].sd_version == networks.SdVersion.SD2
        assert any(k.startswith("model.diffusion_model.input_blocks.1.1.proj_in.") for k in changed)  # linear proj
        for part in (".attn.in_proj_weight", ".attn.out_proj.weight", ".mlp.c_fc.", ".mlp.c_proj."):
            assert any(k.startswith(SD2_TEXT) and part in k for k in changed), part
    if family == "sdxl":
        assert any(k.startswith("conditioner.embedders.0.") for k in changed)
        assert any(".attn.in_proj_weight" in k for k in changed) and any(".attn.out_proj.weight" in k for k in changed)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_run_training_on_the_loaded_model_leaves_it_exactly_as_found(family, webui, sample_dataset, run_job):
    """The adapter's whole job on an SD2 or SDXL checkpoint in the host (SD1: tests/test_webui_api.py): the
    conditioning through the host's wrappers (SD2's OpenCLIP, SDXL's two), a preview through the host's txt2img
    (SD2: v-prediction), the file in the Lora folder and listed as its family, the model untouched. On SDXL the host
    applies CLIP skip only with its "Clip skip SDXL" option, and the file says which."""
    model = loaded_family(webui, family)
    before = model_state(model)
    wrappers = list(model.conditioner.embedders) if family == "sdxl" else [model.cond_stage_model]
    settings = settings_for(sample_dataset, webui / "unused", name=f"{family}_job", steps=2, text_encoder_lr=1e-3,
                            conv_dim=2, conv_alpha=1, preview_every_steps=2, preview_steps=3, clip_skip=2)
    shared.opts.sdxl_clip_l_skip = family == "sdxl"  # Settings → "Clip skip SDXL"
    try:
        result, job = run_job(settings)
    finally:
        shared.opts.sdxl_clip_l_skip = False
    assert result.status == "done" and result.steps_done == 2 and len(job.losses) == 2
    assert result.file == webui / "Lora" / f"{family}_job.safetensors" and f"{family}_job" in networks.available_networks
    version = networks.SdVersion.SDXL if family == "sdxl" else networks.SdVersion.SD2
    assert networks.available_networks[f"{family}_job"].sd_version == version
    assert job.preview and Path(job.preview).is_file()
    with safe_open(str(result.file), "pt") as f:  # the host ignores CLIP skip on SD2, on SDXL without the option
        assert f.metadata()["ss_clip_skip"] == ("2" if family == "sdxl" else "None")
    if family == "sdxl":
        plain, _ = run_job(dataclasses.replace(settings, name="xl_plain", steps=1, preview_every_steps=0))
        with safe_open(str(plain.file), "pt") as f:
            assert f.metadata()["ss_clip_skip"] == "None"
        assert list(model.conditioner.embedders) == wrappers
        assert not any(e.is_trainable for e in model.conditioner.embedders)
    else:
        assert model.cond_stage_model is wrappers[0] and not wrappers[0].is_trainable
    assert shared.sd_model is model
    assert model_state(model) == before


def test_the_users_text_encoder_lora_is_off_while_a_run_encodes_its_captions(webui, sample_dataset, run_job):
    """The last generation's LoRA on the text encoder (A1111 merges it into the weights while the prompt encodes)
    changes nothing in the run: the same step-1 loss as after a plain generation."""
    model = loaded(webui)
    save_file(text_encoder_lora(model.cond_stage_model.wrapped.transformer), str(webui / "Lora" / "users.safetensors"))
    networks.list_available_networks()
    settings = settings_for(sample_dataset, webui / "unused", steps=1)

    def first_loss(name: str) -> float:
        run = dataclasses.replace(settings, name=name)
        return run_job(run)[0].losses[0]

    with_lora = generate("blue circle <lora:users:1>")
    after_lora = first_loss("after-lora")
    plain = generate("blue circle")
    assert not np.array_equal(pixels(with_lora), pixels(plain))  # the LoRA did change the text encoder
    assert after_lora == first_loss("after-plain")
