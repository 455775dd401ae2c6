"""`python -m lohatrain train --checkpoint FILE`: tiny checkpoints of each family, written in the original
single-file layout with their config beside them (as fine-tunes of other sizes ship one), are read, built,
trained, and give the file the tab path gives on the same model; files that cannot be trained are refused in one
line that says why."""
from __future__ import annotations

import dataclasses

import copy
import hashlib
import io
import json
import re
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from ldm.util import instantiate_from_config
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lohatrain.families import ldm_parts
from lohatrain.__main__ import _ProgressReport, main
from lohatrain.checkpoint import load_model, predicts_v, read_checkpoint
from lohatrain.cli_settings import merge
from lohatrain.demo import TINY_SD1_CONFIG, TINY_SD2_CONFIG, build_tiny_sd1, build_tiny_sd2
from lohatrain.demo_sdxl import TINY_SDXL, build_sdxl, build_tiny_sdxl, conditioning_widths
from lohatrain.errors import LohatrainError
from lohatrain.model_configs import LATENT_DIFFUSION
from lohatrain.sdpa import use_sdpa
from lohatrain.settings import TrainSettings
from lohatrain.sgm_standin import SIZE_KEYS
from lohatrain.trainer import Progress, train

from runs import settings_for

BUILD = {"sd1": build_tiny_sd1, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl}
_LDM_TEXT, _SGM_TEXT = "ldm.modules.encoders.modules.", "sgm.modules.encoders.modules."


def sgm_config(sizes: dict, text_encoders: list[dict]) -> dict:
    """An sgm DiffusionEngine config (sd_xl_base.yaml's form) for `demo_sdxl.build_sdxl(sizes)`."""
    context_dim, adm_in_channels = conditioning_widths(sizes)
    ddconfig = {**TINY_SD1_CONFIG["first_stage_config"]["params"]["ddconfig"], "ch": sizes["vae_ch"],
                "ch_mult": list(sizes["vae_ch_mult"]), "num_res_blocks": sizes["vae_res_blocks"]}
    return {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": adm_in_channels, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": sizes["model_channels"], "attention_resolutions": [4, 2], "num_res_blocks": 2,
            "channel_mult": list(sizes["channel_mult"]), "num_head_channels": sizes["num_head_channels"],
            "use_linear_in_transformer": True, "transformer_depth": list(sizes["transformer_depth"]),
            "context_dim": context_dim}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            *text_encoders,
            *({"is_trainable": False, "input_key": key, "target": _SGM_TEXT + "ConcatTimestepEmbedderND",
               "params": {"outdim": sizes["size_dim"]}} for key in SIZE_KEYS)]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}}}}


TINY_CONFIGS = {
    "sd1": {"target": LATENT_DIFFUSION, "params": TINY_SD1_CONFIG},
    "sd2": {"target": LATENT_DIFFUSION, "params": TINY_SD2_CONFIG},
    # lohatrain's text encoders named with their (tiny) sizes, which the file's weights cannot tell
    "sdxl": sgm_config(TINY_SDXL, [
        {"input_key": "txt", "target": "lohatrain.sgm_standin.SDXLCLIPEmbedder",
         "params": {**TINY_SDXL["clip_l"], "layer": "hidden", "layer_idx": TINY_SDXL["clip_l"]["num_layers"] - 1}},
        {"input_key": "txt", "target": "lohatrain.sgm_standin.OpenCLIPEmbedder2",
         "params": {**TINY_SDXL["bigg"], "layer": "penultimate"}}]),
}


def write_checkpoint(model, path: Path, config: dict | None = None) -> Path:
    """The model's state dict as a single-file checkpoint, with `config` beside it as `<name>.yaml`."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 1}, path)
    if config is not None:
        OmegaConf.save(OmegaConf.create({"model": config}), path.with_suffix(".yaml"))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return {family: write_checkpoint(BUILD[family](), folder / f"tiny-{family}.safetensors", TINY_CONFIGS[family])
            for family in BUILD}


pytestmark = pytest.mark.usefixtures("fixed_clock")


def lora_file(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_a_checkpoint_trains_to_the_file_the_tab_writes_on_the_same_model(family, checkpoints, sample_dataset,
                                                                          tmp_path, capsys):
    settings = settings_for(sample_dataset, tmp_path / "tab", steps=2)
    model = BUILD[family]()
    use_sdpa(model)  # the WebUI's default cross-attention optimization
    tab = train(dataclasses.replace(ldm_parts(model), name="tab-model", hash="tab-hash"), settings).file
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**settings.to_dict(), "output_dir": str(tmp_path / "cli")}))

    assert main(["train", "--checkpoint", str(checkpoints[family]), "--config", str(config)]) == 0
    assert f"with {checkpoints[family].with_suffix('.yaml').name}" in capsys.readouterr().out
    tab_tensors, tab_meta = lora_file(tab)
    cli_tensors, cli_meta = lora_file(tmp_path / "cli" / tab.name)
    assert sorted(cli_tensors) == sorted(tab_tensors)
    assert all(torch.equal(cli_tensors[k], tab_tensors[k]) for k in tab_tensors)
    model_keys = {"ss_sd_model_name", "ss_sd_model_hash"}
    assert {k: v for k, v in cli_meta.items() if k not in model_keys} == {
        k: v for k, v in tab_meta.items() if k not in model_keys}
    assert cli_meta["ss_sd_model_name"] == checkpoints[family].name
    assert cli_meta["ss_sd_model_hash"] == hashlib.sha256(checkpoints[family].read_bytes()).hexdigest()


def test_sdpa_attention_gives_ldms_own_results():
    model = build_tiny_sd1()
    fast = copy.deepcopy(model)
    assert use_sdpa(fast) == 16 * 2 + 2  # self- and cross-attention of 16 transformers; the VAE mid-blocks
    torch.manual_seed(0)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ldms, ours = ((m.model.diffusion_model(x, t, context=context), m.first_stage_model.encode(images).mean,
                       m.first_stage_model.decode(x[:1])) for m in (model, fast))
        for a, b in zip(ours, ldms):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_ckpt_is_read_weights_only_and_held_in_the_runs_precision(checkpoints, tmp_path):
    expected = load_file(str(checkpoints["sd1"]))
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"  # floats in some merges
    torch.save({"state_dict": {**expected, position_ids: expected[position_ids].float()}, "global_step": 1},
               tmp_path / "tiny.ckpt")
    shutil.copy(checkpoints["sd1"].with_suffix(".yaml"), tmp_path / "tiny.yaml")
    model, _ = load_model(read_checkpoint(tmp_path / "tiny.ckpt"), "fp16", "cpu")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], expected[k].to(loaded[k].dtype)) for k in expected)
    assert loaded[position_ids].dtype == torch.int64
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert model.alphas_cumprod.dtype == torch.float32  # the noise schedule stays float32, as in the WebUI

    torch.save({"state_dict": expected, "hyper_parameters": Namespace(lr=1.0)}, tmp_path / "code.ckpt")
    with pytest.raises(LohatrainError, match="holds more than weights"):
        read_checkpoint(tmp_path / "code.ckpt")


def test_a_config_in_the_webuis_own_form_builds_a_fine_tune_of_other_sizes(tmp_path):
    """A `<name>.yaml` naming ldm's and sgm's (downloading) text encoders, as v1-inference.yaml and
    sd_xl_base.yaml do: lohatrain's offline ones are built, sized from the file's weights."""
    clip = {"hidden_size": 64, "num_layers": 2, "num_heads": 1, "intermediate_size": 64}
    sd1_config = copy.deepcopy(TINY_SD1_CONFIG)
    sd1_config["unet_config"]["params"]["context_dim"] = 64
    sd1_config["cond_stage_config"] = {"target": "lohatrain.text_encoders.CLIPEmbedder", "params": clip}
    sd1 = instantiate_from_config({"target": LATENT_DIFFUSION, "params": sd1_config})
    sd1_config["cond_stage_config"] = {"target": _LDM_TEXT + "FrozenCLIPEmbedder"}
    sdxl_sizes = {**TINY_SDXL, "clip_l": clip, "bigg": {"width": 64, "layers": 2, "heads": 1}}
    sdxl_config = sgm_config(sdxl_sizes, [
        {"is_trainable": False, "input_key": "txt", "target": _SGM_TEXT + "FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 1}},
        {"is_trainable": False, "input_key": "txt", "target": _SGM_TEXT + "FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}}])
    for model, config in ((sd1, {"target": LATENT_DIFFUSION, "params": sd1_config}),
                          (build_sdxl(sdxl_sizes), sdxl_config)):
        path = write_checkpoint(model, tmp_path / f"{type(model).__name__}.safetensors", config)
        loaded, source = load_model(read_checkpoint(path), "fp32", "cpu")
        assert source == path.with_suffix(".yaml").name
        expected, got = model.state_dict(), loaded.state_dict()
        assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
        with torch.no_grad():  # the same text encoders: the same conditioning
            if hasattr(model, "conditioner"):
                size = torch.tensor([[64, 64]])
                batch = {"txt": ["a red circle"], "original_size_as_tuple": size, "target_size_as_tuple": size,
                         "crop_coords_top_left": torch.zeros_like(size)}
                ours, theirs = loaded.conditioner(batch), model.conditioner(batch)
                assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
            else:
                assert torch.equal(loaded.get_learned_conditioning(["a red circle"]),
                                   model.get_learned_conditioning(["a red circle"]))


@pytest.mark.parametrize("output, v", [(-2.0, True), (0.0, False)])
def test_sd2_without_a_config_is_tested_for_v_prediction_as_the_webui_tests_it(output, v):
    """At t=999 on a grey latent (0.5) a v-model predicts about minus the image: an output more than 1 below the
    input means v (the WebUI's threshold). Here the UNet's last layer is set to give `output` everywhere."""
    unet = build_tiny_sd2().model.diffusion_model.half()
    with torch.no_grad():
        unet.out[2].weight.zero_()
        unet.out[2].bias.fill_(output)
    before = {k: t.clone() for k, t in unet.state_dict().items()}
    assert predicts_v(unet) is v
    assert all(t.dtype == torch.float16 and torch.equal(t, before[k]) for k, t in unet.state_dict().items())


def test_without_a_config_a_file_of_other_sizes_is_refused_naming_the_config_it_needs(checkpoints, tmp_path):
    path = tmp_path / "bare.safetensors"
    shutil.copy(checkpoints["sd1"], path)
    with pytest.raises(LohatrainError) as error:
        load_model(read_checkpoint(path), "fp32", "cpu")
    assert str(error.value).startswith("bare.safetensors is not of the sizes of a SD 1.x base model")
    assert str(error.value).endswith("a model of other sizes needs its config beside it, as bare.yaml")


def _inpainting(weights: dict) -> dict:
    key = "model.diffusion_model.input_blocks.0.0.weight"
    return {**weights, key: torch.cat([weights[key], torch.zeros_like(weights[key])[:, :1].repeat(1, 5, 1, 1)], 1)}


def _refiner(weights: dict) -> dict:
    """SDXL refiner's layout: OpenCLIP-bigG alone, as the conditioner's first embedder."""
    bigg = {k.replace("embedders.1.", "embedders.0."): v for k, v in weights.items()
            if k.startswith("conditioner.embedders.1.")}
    return {**{k: v for k, v in weights.items() if not k.startswith("conditioner.")}, **bigg}


def _cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case, expected", [
    ("missing", "checkpoint {path} does not exist"),
    ("damaged", "{name} cannot be read: the file is damaged, cut short or not a checkpoint"),
    ("cut short", "{name} cannot be read: the file is damaged, cut short or not a checkpoint"),
    ("cut short ckpt", "{name} cannot be read: the file is damaged, cut short or not a checkpoint"),
    ("inpainting", "lohatrain cannot train on {name}: it is an inpainting checkpoint"),
    ("refiner", "lohatrain cannot train on {name}: it is the SDXL refiner"),
    ("lora", "lohatrain cannot train on {name}: it is a LoRA or LyCORIS network file"),
    ("config that imports", "model.yaml: the config names 'lohatrain.output.write_atomically', which lohatrain "
                            "does not build"),
])
def test_a_file_that_cannot_be_trained_is_refused_in_one_line(case, expected, checkpoints, sample_dataset,
                                                              tmp_path, capsys):
    path = tmp_path / ("model.ckpt" if case.endswith("ckpt") else "model.safetensors")
    if case == "damaged":
        path.write_bytes(b"\x00\x01not a checkpoint" * 100)
    elif case == "cut short":
        shutil.copy(checkpoints["sd1"], path)
        _cut_short(path)
    elif case == "cut short ckpt":
        write_checkpoint(build_tiny_sd1(), path)
        _cut_short(path)
    elif case in ("inpainting", "refiner"):
        source = checkpoints["sd1" if case == "inpainting" else "sdxl"]
        save_file((_inpainting if case == "inpainting" else _refiner)(load_file(str(source))), str(path))
    elif case == "lora":
        save_file({"lora_unet_input_blocks_1_1_proj_in.hada_w1_a": torch.zeros(4, 2)}, str(path))
    elif case == "config that imports":  # a YAML that came with a download must not run code
        shutil.copy(checkpoints["sd1"], path)
        config = copy.deepcopy(TINY_CONFIGS["sd1"])
        config["params"]["cond_stage_config"] = {"target": "lohatrain.output.write_atomically", "params": {
            "path": str(tmp_path / "written"), "content": "", "overwrite": True}}
        OmegaConf.save(OmegaConf.create({"model": config}), path.with_suffix(".yaml"))
    out = tmp_path / "out"
    code = main(["train", "--checkpoint", str(path), "--dataset-dir", str(sample_dataset), "--output-dir", str(out)])
    error = capsys.readouterr().err.strip()
    assert code == 2
    assert len(error.splitlines()) == 1 and error.startswith("error: ")
    assert expected.format(path=path, name=path.name) in error
    assert not out.exists() and not (tmp_path / "written").exists()


def test_a_run_on_a_checkpoint_resumes_on_that_checkpoint_only(checkpoints, sample_dataset, tmp_path, capsys):
    args = ["train", "--checkpoint", str(checkpoints["sd1"]), "--dataset-dir", str(sample_dataset),
            "--output-dir", str(tmp_path), "--name", "run", "--resolution", "64", "--batch-size", "2",
            "--network-preset", "small", "--no-gradient-checkpointing", "--seed", "5", "--steps", "1", "--keep-state"]
    assert main(args) == 0
    state = str(tmp_path / "run.lohatrain-state")
    other = tmp_path / "other.safetensors"
    weights = load_file(str(checkpoints["sd1"]))
    weights["model.diffusion_model.out.2.bias"] += 1
    save_file(weights, str(other))
    shutil.copy(checkpoints["sd1"].with_suffix(".yaml"), other.with_suffix(".yaml"))
    capsys.readouterr()

    assert main(["train", "--checkpoint", str(other), "--resume", state, "--steps", "2"]) == 2
    assert f"another checkpoint is loaded (the run was trained on {checkpoints['sd1'].name})" in capsys.readouterr().err
    assert main(["train", "--checkpoint", str(checkpoints["sd1"]), "--resume", state, "--steps", "2"]) == 0
    assert lora_file(tmp_path / "run.safetensors")[1]["ss_steps"] == "2"


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    section = capsys.readouterr().out.split("\nsettings:\n", 1)[1]
    entries = [" ".join(entry.split()) for entry in re.split(r"\n  (?=--)", section)[1:]]
    help_of = {entry.split()[0].rstrip(","): entry for entry in entries}
    assert sorted(help_of) == sorted("--" + name.replace("_", "-") for name in TrainSettings().to_dict())
    assert all("(default: " in text for text in help_of.values())
    assert help_of["--resolution"].endswith("(default: 512 on SD 1.x, 768 on SD 2.x, 1024 on SDXL)")
    assert help_of["--flip-aug"].startswith("--flip-aug, --no-flip-aug")


def test_options_override_the_config_and_what_follows_from_them():
    saved = TrainSettings.defaults_for("sd1").with_preset("small").to_dict()
    settings = TrainSettings.from_dict({**merge(saved, {"network_preset": "high", "resolution": 768}),
                                        "dataset_dir": "x"}, "sd1")
    assert (settings.dim, settings.conv_dim, settings.bucket_min_side, settings.bucket_max_side) == (16, 4, 384, 1536)
    settings = TrainSettings.from_dict({**merge(saved, {"network_preset": "high", "dim": 12}), "dataset_dir": "x"},
                                       "sd1")
    assert (settings.dim, settings.conv_dim, settings.network_preset) == (12, 4, "custom")


def test_steps_show_as_a_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    report = _ProgressReport(terminal)
    for step in (1, 2, 3):
        report(Progress("Training", step, 3, 0.5, 0.5, 1e-3, 2.0, 1.0))
    report.close()
    assert "3/3" in terminal.getvalue() and "loss 0.5000" in terminal.getvalue()
