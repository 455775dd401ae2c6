"""Network targets (attn-only, attn-mlp, full: lohatrain.targets) and kohya's block learning-rate weights.

Every key of every target set lands on the layer it was trained on under the A1111 Lora extension's rules
(tests/host_rules.py) and under ComfyUI's, which Forge and reForge load with (the Forge stand-in's `load_lora` +
`model_lora_keys_unet`), on SD 1.x (kohya's diffusers names: conv_in, conv_out, time_embedding) and SDXL (ldm
names, with the label embedding); a "full" file applied by the hosts' stand-ins reproduces the trained model. Block
weights give each block's parameters the UNet's rate times its weight, numbered as kohya's sd-scripts number them
(the reference below is written from networks/lora.py's rules), and a block of weight 0 keeps its start values."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import host_rules
from a1111 import generate, loaded, loaded_sdxl
from forge_env import lora_patcher, memory_management, probe, train_on, unet_output
from forge_env import settings_for as forge_settings
from runs import resume_run, settings_for, stopping_at

import networks  # noqa: E402  (the A1111 stand-in's, on the path a1111.py sets)
from backend.loader import forge_loader, unet_config  # noqa: E402  (the Forge stand-in's, on forge_env.py's path)
from packages_3rdparty.comfyui_lora_collection.lora import load_lora, model_lora_keys_unet  # noqa: E402

from lohatrain.errors import LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.network import Network, plan_text_encoder, plan_unet
from lohatrain.settings import SettingsError, TrainSettings
from lohatrain.targets import TARGETS
from lohatrain.trainer import Hooks, param_groups, train

ATTENTION = re.compile(r"\.attn[12]\.(to_[qkv]|to_out\.0)$")
# What "full" adds outside the blocks (ldm path → key), as kohya names SD1's and the hosts read SDXL's; the 3x3
# convolutions (conv_in, conv_out) only with conv_dim > 0.
OUTSIDE = {
    "sd1": {"time_embed.0": "lora_unet_time_embedding_linear_1", "time_embed.2": "lora_unet_time_embedding_linear_2",
            "input_blocks.0.0": "lora_unet_conv_in", "out.2": "lora_unet_conv_out"},
    "sdxl": {"time_embed.0": "lora_unet_time_embed_0", "time_embed.2": "lora_unet_time_embed_2",
             "label_emb.0.0": "lora_unet_label_emb_0_0", "label_emb.0.2": "lora_unet_label_emb_0_2",
             "input_blocks.0.0": "lora_unet_input_blocks_0_0", "out.2": "lora_unet_out_2"},
}
CONVS = {"input_blocks.0.0", "out.2"}


def comfy_key_map(unet: nn.Module) -> dict[str, str]:
    """ComfyUI's UNet key map (Forge's and reForge's loaders) for an ldm UNet: its state dict as the KModel holds it
    (`diffusion_model.…`) and its layout as the config ComfyUI's diffusers names follow."""
    kmodel = nn.Module()
    kmodel.diffusion_model = unet
    unet.config = unet_config(unet)
    return model_lora_keys_unet(kmodel)


CASES = [(targets, "locon", 2) for targets in TARGETS] + [("full", "lora", 0)]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("targets,method,conv_dim", CASES, ids=[f"{t}-{m}" for t, m, _ in CASES])
def test_every_key_of_each_target_set_lands_on_its_own_layer_in_every_host(family, family_model, targets, method,
                                                                           conv_dim):
    model = family_model
    parts = ldm_parts(model)
    unet = parts.unet
    plans = plan_unet(parts.family, unet, 4, 2, conv_dim, 1, targets=targets)
    plans += plan_text_encoder(parts, 4, 2, targets)
    tensors = Network(plans, seed=0, method=method).file_tensors(torch.float32)
    path_of = {id(module): path for path, module in unet.named_modules()}
    unet_plans = [p for p in plans if not p.text_encoder]

    mapping = host_rules.module_map(model)  # A1111 (and reForge's A1111 side): the very layer, every key
    for plan in plans:  # a fused attention's q, k, v are named after it, its out after its out_proj
        layer = plan.module if plan.fused is None else plan.fused.out_proj if plan.part == "out" else plan.fused
        assert host_rules.resolve(mapping, plan.key)[1] is layer, plan.key
    assert host_rules.apply_file(copy.deepcopy(model), tensors) == []

    unet_tensors = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    patches, unmatched = load_lora(unet_tensors, comfy_key_map(unet))  # ComfyUI, Forge, reForge
    assert unmatched == {}
    assert set(patches) == {f"diffusion_model.{path_of[id(p.module)]}.weight" for p in unet_plans}

    paths = {path_of[id(p.module)]: p.key for p in unet_plans}
    outside = {path: key for path, key in paths.items() if path in OUTSIDE[family]}
    expected = {path: key for path, key in OUTSIDE[family].items() if conv_dim or path not in CONVS}
    assert outside == (expected if targets == "full" else {})
    text_mlp = [p.key for p in plans if p.text_encoder and "_mlp_" in p.key]
    if targets == "attn-only":
        assert all(ATTENTION.search(path) for path in paths) and not text_mlp
        assert len(paths) == sum(1 for path, m in unet.named_modules() if ATTENTION.search(path))
    else:
        assert text_mlp
        convs = [path for path, key in paths.items() if "in_layers" in path]  # ResBlocks' 3x3 convolutions
        assert bool(convs) == bool(conv_dim)


def host_probe(parts):
    """The UNet's prediction for a fixed latent, timestep and caption, with whatever is applied now."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = parts.condition_on_images(parts.prompt_encoder(None)(["blue circle"]), [(64, 64, 0, 0, 64, 64)])
    with torch.no_grad():
        return parts.predict(x, torch.tensor([500]), cond)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_full_file_applied_by_the_a1111_stand_in_reproduces_the_trained_model(webui, sample_dataset, family):
    """LoCon on every layer "full" has (conv_in, conv_out, the time and label embeddings, both text encoders),
    loaded by the stand-in's own Lora extension for a generation: every key matched, no module errors, and the
    UNet then predicts what the trained model predicted; the layers outside the blocks did change."""
    model = loaded(webui) if family == "sd1" else loaded_sdxl(webui)
    parts = ldm_parts(model)
    steps, seen = 2, {}

    def capture(step, network):
        if step == steps:
            seen["trained"] = host_probe(parts)

    settings = settings_for(sample_dataset, webui / "Lora", name=f"full_{family}", steps=steps, learning_rate=1e-2,
                            text_encoder_lr=1e-2, training_method="locon", conv_dim=2, conv_alpha=1,
                            network_targets="full")
    result = train(parts, settings, Hooks(on_step=capture))
    pure = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    networks.list_available_networks()
    generate(f"red circle <lora:full_{family}:1>")
    assert networks.last_unmatched_keys == [] and not networks.extra_network_lora.errors
    torch.testing.assert_close(host_probe(parts), seen["trained"], atol=5e-5, rtol=1e-4)
    applied = model.model.diffusion_model.state_dict()
    changed = {k.rsplit(".", 1)[0] for k in pure if not torch.equal(applied[k], pure[k])}
    assert changed >= set(OUTSIDE[family])
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert (meta["ss_network_module"], args["algo"], args["preset"]) == ("lycoris.kohya", "locon", "full")


def test_a_full_file_trained_on_forge_reproduces_the_trained_model_through_its_loader(forge_memory, sample_dataset,
                                                                                     tmp_path):
    """On Forge's own SDXL (its Linear class in the time and label embeddings), with ComfyUI's loader."""
    engine = forge_loader("sdxl")
    inputs, seen = probe(engine, "sdxl"), {}

    def capture(step, network):
        if step == 2:
            seen["trained"] = unet_output(engine, "sdxl", inputs)

    settings = forge_settings(sample_dataset, tmp_path, steps=2, training_method="locon", conv_dim=2, conv_alpha=1,
                              network_targets="full")
    result = train_on(engine, settings, on_step=capture)
    tensors = load_file(result.file)
    assert {"lora_unet_label_emb_0_0", "lora_unet_time_embed_0", "lora_unet_input_blocks_0_0",
            "lora_unet_out_2"} <= {k.split(".")[0] for k in tensors}
    trained = lora_patcher(engine, tensors, "full.safetensors")  # asserts every key matched
    with torch.inference_mode():
        memory_management.load_models_gpu([trained])
    torch.testing.assert_close(unet_output(engine, "sdxl", inputs), seen["trained"], atol=2e-5, rtol=1e-4)


def kohya_block(key: str, family: str) -> int | None:
    """A UNet key's block in kohya's numbering (sd-scripts networks/lora.py `get_block_index`): SD1 diffusers names
    by level and position (conv_in, which kohya's own networks never adapt, as input block 0), SDXL ldm names by
    block (time/label embedding and out: kohya's blocks 0 and 22); None for SD1's layers outside the blocks."""
    name = key[len("lora_unet_"):]
    if family == "sdxl":
        if m := re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)_", name):
            return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]] + int(m[2])
        return 0 if name.startswith(("time_embed_", "label_emb_")) else 22
    if name == "conv_in":
        return 0
    if m := re.match(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", name):
        index = 3 * int(m[2]) + (2 if m[3].endswith("samplers") else int(m[4]))
        return 1 + index if m[1] == "down" else 13 + index
    return 12 if name.startswith("mid_block_") else None


def kohya_weights(family: str) -> tuple[dict, list[float]]:
    """The test's block weights and, by kohya's rules, the weight of each block number: an empty entry is 0, missing
    ones 1, `cosine+b` is sin(π/2 · i/(n−1)) + b from the deepest block back."""
    n, mid = (12, "2") if family == "sd1" else (9, "0.3,0.6,0.9")
    down = [0.5, 0.0, 0.25] + [1.0] * (n - 3)
    up = [math.sin(math.pi * (i / (n - 1)) / 2) + 0.1 for i in reversed(range(n))]
    mids = [float(w) for w in mid.split(",")]
    weights = down + mids + up
    return ({"down_lr_weight": "0.5,,0.25", "mid_lr_weight": mid, "up_lr_weight": "cosine+0.1"},
            weights if family == "sd1" else [1.0, *weights, 1.0])


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_block_weights_scale_the_learning_rate_of_exactly_their_blocks(family, family_model, tmp_path):
    parts = ldm_parts(family_model)
    given, by_block = kohya_weights(family)
    settings = dataclasses.replace(settings_for(tmp_path, tmp_path, training_method="locon", conv_dim=2,
                                                network_targets="full", text_encoder_lr=1e-4), **given)
    plans = plan_unet(parts.family, parts.unet, 4, 2, 2, 1, targets="full") + plan_text_encoder(parts, 4, 2)
    network = Network(plans, seed=0, method="locon")
    lr_of = {id(p): group["lr"] for group in param_groups(network, settings, parts.family) for p in group["params"]}
    for plan, adapter in zip(network.plans, network.adapters):
        if plan.text_encoder:
            expected = settings.text_encoder_lr
        else:
            block = kohya_block(plan.key, family)
            expected = settings.learning_rate * (1.0 if block is None else by_block[block])
        for p in adapter.parameters():
            if expected == 0:
                assert id(p) not in lr_of and not p.requires_grad, plan.key
            else:
                assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), plan.key
    assert sum(p.numel() for p in network.parameters() if id(p) not in lr_of) > 0  # input block 1's are left out

    fresh = Network(plans, seed=0, method="locon")  # no weights: one UNet group at its rate, as before they existed
    plain = param_groups(fresh, dataclasses.replace(settings, **dict.fromkeys(given, "")), parts.family)
    assert [sorted(g) for g in plain] == [["lr", "params"]] * 2 and plain[0]["lr"] == settings.learning_rate
    assert [id(p) for p in plain[0]["params"]] == [id(p) for p in fresh.parameters_of(text_encoder=False)]


def test_a_block_of_weight_0_keeps_its_start_values_and_resumes_exactly(tiny_model, sample_dataset, tmp_path,
                                                                        monkeypatch):
    """Down and middle blocks at 0 (conv_in among them): their adapters are what the seed made, in the file; the up
    blocks and the layers outside the blocks trained. A run stopped and resumed ends in the same bytes."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    kw = dict(steps=4, training_method="locon", conv_dim=2, conv_alpha=1, learning_rate=1e-2, network_targets="full",
              down_lr_weight="zeros", mid_lr_weight="0")
    settings = settings_for(sample_dataset, tmp_path / "whole", **kw)
    result = train(ldm_parts(copy.deepcopy(tiny_model)), settings)
    parts = ldm_parts(tiny_model)
    plans = plan_unet(parts.family, parts.unet, settings.dim, settings.alpha, settings.conv_dim, settings.conv_alpha,
                      targets="full")
    start = Network(plans, seed=settings.seed, method="locon").file_tensors(torch.float32)
    saved = load_file(result.file)
    assert saved.keys() == start.keys()
    frozen = {k for k in saved if kohya_block(k.split(".")[0], "sd1") in range(13)}
    assert frozen and all(torch.equal(saved[k], start[k]) for k in frozen)
    trained = {k.split(".")[0] for k in saved if not torch.equal(saved[k], start[k])}
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_conv_out"} <= trained
    assert any(k.startswith("lora_unet_up_blocks_") for k in trained)

    stopped = tmp_path / "stopped"
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, stopped, **kw), stopping_at(2))
    assert resume_run(copy.deepcopy(tiny_model), stopped).file.read_bytes() == result.file.read_bytes()

    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    args, shared = json.loads(meta["ss_network_args"]), json.loads(meta["lohatrain_settings"])
    assert {k: args.get(k) for k in ("preset", "down_lr_weight", "mid_lr_weight", "up_lr_weight")} == {
        "preset": "full", "down_lr_weight": "zeros", "mid_lr_weight": "0", "up_lr_weight": None}
    assert (shared["network_targets"], shared["down_lr_weight"]) == ("full", "zeros")


def test_a_default_run_writes_none_of_the_new_settings(tiny_model, sample_dataset, tmp_path):
    """Default targets and no block weights: the file's metadata is what it was before they existed (kohya's module
    for plain LoRA, no `preset` or block weights in its arguments, none of them in lohatrain_settings)."""
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=1, training_method="lora"))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and json.loads(meta["ss_network_args"]) == {}
    new = {"network_targets", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold"}
    assert not new & set(json.loads(meta["lohatrain_settings"]))


@pytest.mark.parametrize("values,problem", [
    (dict(network_targets="everything"), "network_targets must be one of attn-only, attn-mlp, full, not 'everything'"),
    (dict(down_lr_weight="1,x"), "down_lr_weight: 'x' is not a number; give numbers separated by commas, or a curve"),
    (dict(up_lr_weight="sine+-1"), "up_lr_weight: a weight must be a number of 0 or more, not -1"),
    (dict(up_lr_weight="1,nan"), "up_lr_weight: a weight must be a number of 0 or more, not nan"),
    (dict(mid_lr_weight="sine"), "mid_lr_weight: 'sine' is not a number; give numbers separated by commas"),
    (dict(block_lr_zero_threshold=-0.5), "block_lr_zero_threshold must be at least 0 and at most 1000, not -0.5"),
])
def test_a_bad_target_or_block_weight_is_refused_with_its_message(values, problem):
    with pytest.raises(SettingsError) as refused:
        TrainSettings.from_dict({"dataset_dir": "images", **values})
    assert refused.value.problems[0].startswith(problem) and len(refused.value.problems) == 1


def test_block_weights_are_checked_against_the_loaded_models_blocks(tiny_model, sdxl_model, sample_dataset,
                                                                     tmp_path):
    """SD 1.x has 12 down blocks and SDXL 9 (kohya's counts): 12 weights train on the one, are refused on the other;
    weights that leave nothing to train are refused before a run starts."""
    from lohatrain.preflight import check_model

    twelve = settings_for(sample_dataset, tmp_path, down_lr_weight=",".join(["1"] * 12))
    check_model(ldm_parts(tiny_model), twelve)
    with pytest.raises(LohatrainError, match=r"down_lr_weight: 12 weights given, this model has 9 such blocks "
                                             r"\(SDXL: 9 down, 3 middle and 9 up blocks\)"):
        check_model(ldm_parts(sdxl_model), twelve)
    nothing = dataclasses.replace(twelve, down_lr_weight="zeros", mid_lr_weight="0.5", up_lr_weight="zeros+0.2",
                                  block_lr_zero_threshold=0.5)
    with pytest.raises(LohatrainError, match="every block's learning-rate weight is 0"):
        check_model(ldm_parts(tiny_model), nothing)
    check_model(ldm_parts(tiny_model), dataclasses.replace(nothing, network_targets="full"))


def test_the_command_line_takes_targets_and_block_weights(sample_dataset, tmp_path, capsys):
    from lohatrain.__main__ import main

    common = ["train", "--demo", "--output-dir", str(tmp_path), "--steps", "1", "--resolution", "64",
              "--batch-size", "2", "--network-targets", "attn-only"]
    assert main([*common, "--family", "sdxl", "--up-lr-weight", "1,1,1,1,1,1,1,1,1,1"]) == 2
    assert "up_lr_weight: 10 weights given, this model has 9 such blocks" in capsys.readouterr().err
    assert main([*common, "--up-lr-weight", "sine", "--name", "cli"]) == 0
    with safe_open(tmp_path / "cli.safetensors", "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert json.loads(meta["ss_network_args"])["preset"] == "attn-only"
    assert json.loads(meta["ss_network_args"])["up_lr_weight"] == "sine"
    assert keys and all(re.search(r"_attn[12]_(to_[qkv]|to_out_0)$", k.split(".")[0]) for k in keys)


def test_rest_refuses_a_bad_target_or_block_weight_with_422(webui_server):
    """Each bad value named in the 422's list; weights for more blocks than the loaded model (SD 1.x) has are
    refused before a job starts."""
    import httpx
    from page import run_body

    ui = webui_server
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(
        ui, "bad-targets", network_targets="all", down_lr_weight="-1", mid_lr_weight="sine"))
    assert r.status_code == 422
    assert [p.split(":")[0].split()[0] for p in r.json()["detail"]] == ["network_targets", "down_lr_weight",
                                                                       "mid_lr_weight"]
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "too-many", up_lr_weight=",".join(["1"] * 13)))
    assert r.status_code == 422 and r.json()["detail"] == [
        "up_lr_weight: 13 weights given, this model has 12 such blocks (SD 1.x: 12 down, 1 middle and 12 up blocks)"]
    assert not list(ui.lora_dir.glob("bad-targets*")) and not list(ui.lora_dir.glob("too-many*"))
