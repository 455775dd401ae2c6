"""Every network type on the tiny real SD1 model: it learns, its file reproduces the trained model when applied
with the published formula (tests/host_rules.py, written independently of lohatrain), and the metadata names the
type as kohya's tools (with LyCORIS' `lycoris.kohya`) and the WebUI's Lora tab read it. The same files on SD2 and
SDXL through the host stand-in's own loaders: tests/test_a1111.py; the same bytes as recorded, for every type and
family: tests/test_golden.py."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lohatrain import methods
from lohatrain.errors import LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.families.sd1 import SD1
from lohatrain.network import Network, plan_unet
from lohatrain.settings import TrainSettings
from lohatrain.trainer import Hooks, train

from host_rules import apply_file, delta, group_keys, module_map, resolve
from runs import denoising_loss, family_model, settings_for

TYPES = [("lora", False), ("locon", False), ("lokr", False), ("lora", True), ("locon", True), ("loha", True)]
IDS = [f"{m}{'+dora' if d else ''}" for m, d in TYPES]


def type_settings(dataset, out, method, dora, **overrides):
    # the tiny model learns visibly in a few steps at learning rate 2e-2, whatever the type
    return settings_for(dataset, out, **{"training_method": method, "dora": dora, "lokr_factor": 4, "dim": 4,
                                         "alpha": 2, "conv_dim": 2 if methods.TYPES[method].convolutions else 0,
                                         "conv_alpha": 1, "learning_rate": 2e-2, **overrides})


@pytest.mark.parametrize("method", methods.TYPES)
def test_every_registered_type_trains_its_declared_file_and_goes_on_from_it(tiny_model, sample_dataset, tmp_path,
                                                                           method):
    """What lohatrain.methods declares is all a type needs: trained through the one path, every layer of its file
    has the key suffixes the type is recognised by, a run of it starts from that file (to train it further),
    and every type whose files look different refuses the file naming what it is."""
    kind = methods.TYPES[method]
    first = train(ldm_parts(copy.deepcopy(tiny_model)),
                  type_settings(sample_dataset, tmp_path, method, False, steps=2, name="first"))
    saved = load_file(first.file)
    layers = group_keys(saved)
    assert layers and all(set(kind.suffixes) <= set(parts) for parts in layers.values())
    more = train(ldm_parts(copy.deepcopy(tiny_model)),
                 type_settings(sample_dataset, tmp_path, method, False, steps=1, name="more",
                               init_from="first.safetensors", learning_rate=1e-9))
    again = load_file(more.file)
    assert again.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], atol=1e-6, rtol=0)
    for other in methods.TYPES.values():
        if other.file_kind == kind.file_kind:
            continue
        plans = plan_unet(SD1, tiny_model.model.diffusion_model, 4, 2, 2 if other.convolutions else 0, 1)
        with pytest.raises(LohatrainError, match=f"it is a {kind.file_kind} file, these settings train "
                                                 f"{other.file_kind}"):
            Network(plans, seed=0, method=other.name, factor=4).load_file_tensors(saved, "first.safetensors")


@pytest.mark.parametrize("method", methods.TYPES)
def test_settings_allow_dora_and_convolutions_exactly_where_the_type_declares_them(method):
    """The tab greys DoRA out by the same declaration that validation reads, so a form it allows is accepted."""
    kind = methods.TYPES[method]
    plain = dataclasses.replace(TrainSettings.defaults_for("sd1", method), dataset_dir="images", conv_dim=0)
    assert plain.problems() == []
    assert (dataclasses.replace(plain, dora=True).problems() == []) == kind.dora
    assert (dataclasses.replace(plain, conv_dim=4, conv_alpha=2).problems() == []) == kind.convolutions


@pytest.mark.parametrize("method,dora", TYPES, ids=IDS)
def test_each_type_learns_and_its_file_reproduces_the_trained_model(tiny_model, sample_dataset, tmp_path,
                                                                     method, dora):
    fresh = copy.deepcopy(tiny_model)
    before = denoising_loss(fresh, sample_dataset)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    seen = {}

    def capture(step, network):
        if step == 6:
            seen["trained"] = tiny_model.apply_model(x, t, tiny_model.get_learned_conditioning(["blue circle"]))

    result = train(ldm_parts(tiny_model), type_settings(sample_dataset, tmp_path, method, dora, steps=6, text_encoder_lr=1e-3), Hooks(on_step=capture))
    assert apply_file(fresh, load_file(result.file)) == []
    with torch.no_grad():
        file_out = fresh.apply_model(x, t, fresh.get_learned_conditioning(["blue circle"]))
    torch.testing.assert_close(file_out, seen["trained"], atol=5e-5, rtol=1e-4)
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.95 * before, (before, after)


# kohya's `networks.lora` has no DoRA, so a LoRA with DoRA is LyCORIS' `lycoris.kohya` with `algo` "lora" (LyCORIS'
# name for plain LoRA; LoCon is its "locon"), and DoRA says which axis `dora_scale` is on: ours is per input
# channel, LyCORIS' default per output.
@pytest.mark.parametrize("method,dora,module,algo", [
    ("lora", False, "networks.lora", None), ("locon", False, "lycoris.kohya", "locon"),
    ("lokr", False, "lycoris.kohya", "lokr"), ("lora", True, "lycoris.kohya", "lora"),
    ("locon", True, "lycoris.kohya", "locon"), ("loha", True, "lycoris.kohya", "loha")],
    ids=["lora", "locon", "lokr", "lora+dora", "locon+dora", "loha+dora"])
def test_metadata_names_the_type(tiny_model, sample_dataset, tmp_path, method, dora, module, algo):
    result = train(ldm_parts(tiny_model), type_settings(sample_dataset, tmp_path, method, dora, steps=1))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == module and args.get("algo") == algo
    dora_args = {k: args[k] for k in ("dora_wd", "wd_on_output") if k in args}
    assert dora_args == ({"dora_wd": "True", "wd_on_output": "False"} if dora else {})
    assert json.loads(meta["lohatrain_settings"])["training_method"] == method
    if method == "lokr":
        assert args["factor"] == "4"


def _lycoris_network_from_file(model, path, preset_path):
    """What kohya's trainer does to go on training a file: its `ss_network_module`'s `create_network` with its
    dim, alpha and `ss_network_args`, `apply_to`, then `load_weights`. Our SD1 keys use diffusers' names, the
    tiny model ldm's, so the UNet and text encoder handed over are containers holding the model's own layers
    under the file's names, and a LyCORIS preset (a toml file, as a user's) targets exactly those."""
    with safe_open(path, "pt") as f:
        meta, layers = f.metadata(), {key.split(".")[0] for key in f.keys()}
    mapping = module_map(model)
    unet, text_encoder = nn.Module(), nn.Module()
    for layer in sorted(layers):
        prefix, container = ("lora_unet_", unet) if layer.startswith("lora_unet_") else ("lora_te_", text_encoder)
        container.add_module(layer[len(prefix):], resolve(mapping, layer)[1])
    preset_path.write_text(
        "enable_conv = true\nunet_target_module = []\ntext_encoder_target_module = []\nuse_fnmatch = true\n"
        f"unet_target_name = {json.dumps(list(unet._modules))}\n"
        f"text_encoder_target_name = {json.dumps(list(text_encoder._modules))}\n")
    kohya_module = importlib.import_module(meta["ss_network_module"])  # as kohya's train_network.py does
    network = kohya_module.create_network(1.0, int(meta["ss_network_dim"]), float(meta["ss_network_alpha"]), None,
                                          text_encoder, unet, preset=str(preset_path),
                                          **json.loads(meta["ss_network_args"]))
    network.apply_to(text_encoder, unet, bool(text_encoder._modules), True)
    return network, network.load_weights(str(path))


@pytest.mark.parametrize("method", ["lora", "locon", "loha"])
def test_lycoris_reads_a_dora_file_with_its_metadata_as_the_webui_applies_it(tiny_model, sample_dataset, tmp_path,
                                                                             monkeypatch, method):
    """kohya's trainer with LyCORIS, given the file and its metadata, runs every layer as the WebUI applies the
    file: it needs `lycoris.kohya` and DoRA's axis (with LyCORIS' default, per output, `dora_scale` does not
    even load)."""
    from lycoris.kohya import LycorisNetworkKohya

    for attr in ("ENABLE_CONV", "UNET_TARGET_REPLACE_MODULE", "UNET_TARGET_REPLACE_NAME", "USE_FNMATCH",
                 "TEXT_ENCODER_TARGET_REPLACE_MODULE", "TEXT_ENCODER_TARGET_REPLACE_NAME"):
        monkeypatch.setattr(LycorisNetworkKohya, attr, getattr(LycorisNetworkKohya, attr))  # a preset sets these
    fresh = copy.deepcopy(tiny_model)
    result = train(ldm_parts(tiny_model), type_settings(sample_dataset, tmp_path, method, True, steps=2, text_encoder_lr=1e-3))
    network, state = _lycoris_network_from_file(fresh, result.file, tmp_path / "preset.toml")
    assert state == {}  # every tensor of the file found its place
    layers = group_keys(load_file(result.file))
    assert sorted(lora.lora_name for lora in network.loras) == sorted(layers)
    generator = torch.Generator().manual_seed(0)
    for lora in network.loras:
        assert lora.wd and not lora.wd_on_out
        layer = lora.org_module[0]
        weight = layer.weight + delta(layers[lora.lora_name], layer.weight).float()  # the WebUI's (host_rules)
        conv = isinstance(layer, nn.Conv2d)
        x = torch.randn(2, layer.weight.shape[1], *([8, 8] if conv else []), generator=generator)
        with torch.no_grad():
            expected = (F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
                        if conv else F.linear(x, weight, layer.bias))
            torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("method", ["locon", "lokr"])
def test_types_with_convolutions_learn_on_sd2_and_sdxl(sample_dataset, tmp_path, family, method):
    """The loss goes down with the file applied by the published formulas to a fresh model. (Attention-only
    types on the tiny SDXL are not asked to: it has attention at its lower levels alone, and attention-only
    training does not move its loss in a few dozen steps, LoHa's neither, test_engine.py.)"""
    template = family_model(family)
    fresh = copy.deepcopy(template)
    before = denoising_loss(fresh, sample_dataset)
    result = train(ldm_parts(template), type_settings(sample_dataset, tmp_path, method, False, steps=8))
    assert apply_file(fresh, load_file(result.file)) == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.97 * before, (before, after)
