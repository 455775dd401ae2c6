"""Importing a kohya config (lohatrain.kohya_config): the kohya_ss GUI's JSON and sd-scripts' TOMLs become settings
that lohatrain accepts, each option taken by name with its value converted, and every option without an
equivalent named in one message. The GUI configs are ours, in kohya_ss's format (tests/data/kohya/README.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from lohatrain.__main__ import main
from lohatrain.kohya_config import (NEEDS_DATASET, NO_EQUIVALENT, OTHER_FAMILY, OWN_WAY, REFUSED, import_file,
                                    import_text)
from lohatrain.settings import SettingsError, TrainSettings

DATA = Path(__file__).parent / "data" / "kohya"
GUI_CONFIGS = sorted(DATA.glob("*.json"))


def listed(imported, group: str) -> dict:
    """The options listed as not taken under `group`: name → value."""
    return {n.option: n.value for n in imported.not_taken if n.group == group}


def gui(**fields) -> str:
    """A kohya_ss GUI config's text with these fields."""
    return json.dumps({"LoRA_type": "Standard", "network_dim": 8, "network_alpha": 4, "learning_rate": 1e-4,
                       "unet_lr": 1e-4, "text_encoder_lr": 0, "optimizer": "AdamW", "train_batch_size": 1,
                       "max_resolution": "512,512", "max_train_steps": 100, **fields})


def image_folder(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}", encoding="utf-8")
    return folder


@pytest.mark.parametrize("path", GUI_CONFIGS, ids=[p.stem for p in GUI_CONFIGS])
def test_every_gui_config_becomes_settings_lohatrain_accepts_with_each_field_accounted_for(path):
    family = "sdxl" if path.stem.startswith("sdxl") else "sd1"
    imported = import_file(path, family=family)
    settings = imported.complete(family)  # raises if lohatrain refused anything it kept
    assert settings.dataset_dir == ""  # none of these names a folder: the user picks one
    names = [*imported.taken, *(n.option for n in imported.not_taken), *imported.quiet]
    assert len(names) == len(set(names)), "an option counted twice"
    assert [key for key in json.loads(path.read_text()) if not imported.accounts_for(key)] == []
    assert imported.message().startswith(f"Imported a kohya_ss GUI config: {len(imported.taken)} options taken, "
                                         f"{len(imported.not_taken)} not taken")


def test_a_lycoris_loha_config_is_taken_by_name_and_value():
    imported = import_file(DATA / "sdxl-lycoris-loha.json", family="sdxl")
    s = imported.settings
    assert (s["training_method"], s["dim"], s["alpha"], s["conv_dim"], s["conv_alpha"]) == ("loha", 16, 8.0, 8, 8.0)
    assert s["network_targets"] == "full"  # LyCORIS' preset full: conv_in, conv_out and the embeddings too
    assert (s["learning_rate"], s["text_encoder_lr"]) == (5e-4, 1e-4)  # unet_lr is the UNet's rate
    assert (s["optimizer"], s["weight_decay"], s["optimizer_args"]) == ("adamw8bit", 0.05, "betas=0.9,0.99")
    assert (s["resolution"], s["bucketing"], s["bucket_min_side"], s["bucket_max_side"]) == (1024, True, 512, 2048)
    assert (s["multires_noise_iterations"], s["multires_noise_discount"]) == (6, 0.3)
    assert "noise_offset" not in s  # noise_offset_type Multires: the GUI does not pass the offset
    assert (s["ip_noise_gamma"], s["debiased_estimation_loss"], s["min_snr_gamma"]) == (0.05, True, 5.0)
    assert (s["loss_type"], s["huber_schedule"], s["huber_c"]) == ("huber", "snr", 0.1)
    assert (s["train_dtype"], s["save_dtype"], s["batch_size"], s["seed"]) == ("bf16", "fp16", 2, 4321)
    assert (s["shuffle_tags"], s["keep_tokens"], s["flip_aug"], s["lr_scheduler"]) == (True, 1, True, "cosine")
    assert (s["name"], s["caption_ext"], s["gradient_checkpointing"]) == ("test-loha-xl", ".txt", True)
    assert s["caption_dropout_rate"] == 0.1
    # no folder: the epochs, the save interval in epochs and the warm-up percent cannot become steps
    assert listed(imported, NEEDS_DATASET) == {"epoch": 6, "save_every_n_epochs": 2, "lr_warmup": 10}
    assert "steps" not in s and "lr_warmup_steps" not in s
    assert listed(imported, OWN_WAY)["sdxl"] is True


def test_an_older_gui_config_with_text_numbers_block_weights_and_extra_parameters():
    imported = import_file(DATA / "sd15-standard-prodigy.json")
    s = imported.settings
    assert (s["training_method"], s["dim"], s["alpha"], s["conv_dim"]) == ("lora", 32, 16.0, 0)  # Standard: no conv
    assert (s["down_lr_weight"], s["block_lr_zero_threshold"]) == ("0,0.5,1,1,1,1,1,1,1,1,1,1", 0.1)
    # the extra parameter --network_train_unet_only: no text-encoder rate
    assert (s["optimizer"], s["learning_rate"], s["text_encoder_lr"]) == ("prodigy", 1.0, 0.0)
    assert (s["prodigy_d_coef"], s["prodigy_bias_correction"], s["prodigy_safeguard_warmup"]) == (2.0, True, True)
    assert (s["weight_decay"], s["optimizer_args"]) == (0.01, "decouple=True d0=1e-6")
    assert (s["clip_skip"], s["seed"], s["noise_offset"], s["caption_ext"]) == (2, 1234, 0.05, ".caption")
    assert (s["steps"], s["lr_scheduler"], s["lr_warmup_steps"]) == (400, "constant", 20)  # 5% of 400, warm-up kept
    assert (s["resolution"], s["save_every_steps"], s["train_dtype"]) == (576, 100, "fp16")
    assert "max_resolution 512,640 → resolution 576" in "\n".join(imported.changed)
    assert set(listed(imported, NO_EQUIVALENT)) == {
        "bucket_no_upscale", "bucket_reso_steps", "gradient_accumulation_steps", "max_token_length", "random_crop",
        "training_comment", "additional_parameters --max_grad_norm", "additional_parameters --lr_scheduler_type",
        "additional_parameters --lr_scheduler_args"}
    assert imported.complete().steps == 400


def test_a_lokr_adafactor_config_with_sample_prompts():
    imported = import_file(DATA / "sd15-lokr-adafactor.json")
    s = imported.settings
    assert (s["training_method"], s["dim"], s["lokr_factor"], s["network_targets"]) == ("lokr", 100000, 8, "attn-mlp")
    assert s["conv_dim"] == 1  # lohatrain's LoKr keeps a convolution's w2 whole: conv_dim 8 only switches them on
    assert (s["optimizer"], s["adafactor_relative_step"], "optimizer_args" in s) == ("adafactor", False, False)
    assert (s["lr_scheduler"], s["steps"], s["bucket_min_side"], s["bucket_max_side"]) == ("cosine", 600, 320, 960)
    assert s["preview_prompts"] == ["a photo of sks cat", "sks cat on a sofa"]
    assert (s["preview_every_steps"], s["preview_sampler"], s["keep_state"]) == (50, "Euler a", True)
    changes = "\n".join(imported.changed)
    for change in ("conv_dim 8 → conv_dim 1", "cosine_with_restarts with 3 cycles → cosine",
                   "min_bucket_reso 300 → bucket_min_side 320", "max_bucket_reso 1000 → bucket_max_side 960"):
        assert change in changes
    assert listed(imported, NO_EQUIVALENT) == {"decompose_both": True}


def test_a_network_or_a_model_lohatrain_does_not_train_is_named_and_its_size_not_taken():
    ia3 = import_file(DATA / "sd15-ia3.json")
    assert listed(ia3, NO_EQUIVALENT) == {"LoRA_type": "LyCORIS/iA3", "network_dim": 1, "network_alpha": 1}
    assert not {"training_method", "dim", "alpha"} & set(ia3.settings)
    whole_model = import_text(json.dumps({"learning_rate": 1e-5, "max_train_steps": 10}))  # a Dreambooth tab's
    assert [n.option for n in whole_model.not_taken] == ["LoRA_type"] and whole_model.settings["steps"] == 10
    flux = import_file(DATA / "flux1-lora.json")
    assert listed(flux, NO_EQUIVALENT)["LoRA_type"] == "Flux1"
    assert {"flux1_checkbox", "t5xxl", "clip_l", "ae", "guidance_scale", "timestep_sampling"} <= set(
        listed(flux, OTHER_FAMILY))


def test_options_at_kohya_defaults_are_not_listed_and_set_ones_are_in_one_message():
    at_defaults = import_text(gui(max_grad_norm=1, bucket_reso_steps=64, enable_bucket=True,
                                  gradient_accumulation_steps="1", max_token_length="75", scale_weight_norms=0,
                                  xformers="xformers", cache_latents=True, vae_batch_size=0, network_dropout=0,
                                  random_crop=False, noise_offset_type="Original", caption_dropout_every_n_epochs=0.0))
    assert at_defaults.not_taken == []
    assert at_defaults.message() == (f"Imported a kohya_ss GUI config: {len(at_defaults.taken)} options taken, 0 "
                                     f"not taken ({len(at_defaults.quiet)} more at kohya's defaults or unused by "
                                     "kohya for it).")
    set_away = import_text(gui(max_grad_norm=0, bucket_reso_steps=32, enable_bucket=True,
                               gradient_accumulation_steps=4, max_token_length=225, scale_weight_norms=1,
                               xformers="none", mem_eff_attn=True, network_dropout=0.1, random_crop=True,
                               v_pred_like_loss=0.2, pretrained_model_name_or_path="model.safetensors"))
    assert set(listed(set_away, NO_EQUIVALENT)) == {"max_grad_norm", "bucket_reso_steps", "gradient_accumulation_steps",
                                                    "max_token_length", "scale_weight_norms", "network_dropout",
                                                    "random_crop", "v_pred_like_loss"}
    assert set(listed(set_away, OWN_WAY)) == {"xformers", "mem_eff_attn", "pretrained_model_name_or_path"}
    lines = set_away.message().splitlines()
    assert lines[1] == "Not taken:"
    assert lines[2].startswith(f"- {NO_EQUIVALENT}: ") and "max_grad_norm = 0; " in lines[2]
    assert lines[3].startswith(f"- {OWN_WAY}: ") and 'xformers = "none"' in lines[3]
    assert len(lines) == 4  # one message: a line per group


def test_epochs_become_steps_from_the_dataset_folder(tmp_path):
    folder = image_folder(tmp_path / "images", 8)
    imported = import_text(gui(max_train_steps=0, epoch=3, train_batch_size=2, train_data_dir=str(folder),
                               save_every_n_epochs=1, lr_warmup=25))
    s = imported.settings
    assert (s["dataset_dir"], s["steps"], s["save_every_steps"], s["lr_warmup_steps"]) == (str(folder), 12, 4, 3)
    assert "epoch 3 → steps 12 (4 steps an epoch" in "\n".join(imported.changed)
    missing = import_text(gui(max_train_steps=0, epoch=3, train_data_dir=str(tmp_path / "gone")))
    assert "steps" not in missing.settings and set(listed(missing, NEEDS_DATASET)) == {"epoch"}
    not_allowed = import_text(gui(max_train_steps=0, max_train_epochs=3, train_data_dir=str(folder)),
                              may_read=lambda path: False)  # the path rule of a WebUI on the network
    assert "may not be read" in next(n.why for n in not_allowed.not_taken if n.option == "max_train_epochs")


def test_kohya_folders_count_their_repeats_and_regularization_images(tmp_path):
    image_folder(tmp_path / "train" / "10_alice", 3)
    image_folder(tmp_path / "train" / "5_bob", 2)
    image_folder(tmp_path / "reg" / "1_person", 4)
    imported = import_text(gui(max_train_steps=0, epoch=2, train_batch_size=4, train_data_dir=str(tmp_path / "train"),
                               reg_data_dir=str(tmp_path / "reg")))
    assert imported.settings["steps"] == 2 * 20  # (3×10 + 2×5) draws, as many class images: 80 / batch 4


def sd_scripts_config(**lines) -> str:
    return "\n".join(f"{key} = {json.dumps(value)}" for key, value in lines.items())


def test_a_hand_written_toml_with_two_subsets_and_a_regularization_subset(tmp_path):
    image_folder(tmp_path / "train" / "10_alice", 3)
    image_folder(tmp_path / "train" / "5_bob", 2)
    image_folder(tmp_path / "reg" / "1_person", 4)
    config = f"""
[model]
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 4
network_args = ["algo=loha", "conv_dim=4", "conv_alpha=2", "preset=attn-mlp", "rank_dropout=0.1"]

[training]
optimizer_type = "adamw"
optimizer_args = ["weight_decay=0.1"]
learning_rate = 1e-4
unet_lr = 2e-4
text_encoder_lr = [5e-5, 5e-5]
lr_scheduler = "cosine"
lr_warmup_steps = 0.1
max_train_epochs = 4
mixed_precision = "bf16"
save_precision = "fp16"
seed = 7
output_name = "alice-bob"
scale_weight_norms = 1.0
dataset_config = "{tmp_path / 'dataset.toml'}"
"""
    (tmp_path / "dataset.toml").write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
caption_prefix = "photo of "

[[datasets]]
resolution = [512, 512]
batch_size = 2
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'train' / '10_alice'}"
  num_repeats = 10
  class_tokens = "alice"

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'train' / '5_bob'}"
  num_repeats = 5
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{tmp_path / 'reg' / '1_person'}"
  num_repeats = 1
  is_reg = true
""", encoding="utf-8")
    (tmp_path / "config.toml").write_text(config, encoding="utf-8")
    imported = import_file(tmp_path / "config.toml")  # the dataset config it names is read too
    s = imported.settings
    assert (s["training_method"], s["dim"], s["alpha"], s["conv_dim"], s["conv_alpha"]) == ("loha", 8, 4.0, 4, 2.0)
    assert (s["network_targets"], s["learning_rate"], s["text_encoder_lr"]) == ("attn-mlp", 2e-4, 5e-5)
    assert (s["optimizer"], s["weight_decay"], s["train_dtype"], s["save_dtype"]) == ("adamw", 0.1, "bf16", "fp16")
    assert (s["resolution"], s["batch_size"], s["bucketing"], s["bucket_min_side"]) == (512, 2, True, 256)
    assert (s["shuffle_tags"], s["keep_tokens"], s["caption_ext"], s["name"]) == (True, 1, ".txt", "alice-bob")
    assert set(listed(imported, NO_EQUIVALENT)) >= {"flip_aug", "network_args rank_dropout", "scale_weight_norms",
                                                    "caption_prefix"}
    assert listed(imported, NO_EQUIVALENT)["flip_aug"] == {"datasets[0].subsets[0]": False,
                                                          "datasets[0].subsets[1]": True,
                                                          "datasets[0].subsets[2]": False}
    assert (s["dataset_dir"], s["reg_data_dir"]) == (str(tmp_path / "train"), str(tmp_path / "reg"))
    assert (s["steps"], s["lr_warmup_steps"]) == (160, 16)  # 4 epochs of (30 + 10) × 2 draws / batch 2


def test_subsets_whose_folder_names_do_not_carry_their_repeats_are_listed(tmp_path):
    image_folder(tmp_path / "alice", 2)
    image_folder(tmp_path / "3_bob", 2)
    dataset = f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'alice'}"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "{tmp_path / '3_bob'}"
  num_repeats = 5
"""
    imported = import_text(dataset)  # a dataset config alone
    assert imported.kind == "sd-scripts dataset config" and "dataset_dir" not in imported.settings
    why = next(n.why for n in imported.not_taken if n.option == "training subsets' image_dir and num_repeats")
    assert "named N_name with N its num_repeats (10_alice)" in why
    assert why.endswith("alice (num_repeats 10), 3_bob (num_repeats 5)")


def test_what_an_sd_scripts_toml_leaves_out_is_sd_scripts_default():
    imported = import_text(sd_scripts_config(network_module="networks.lora", network_dim=16))
    s = imported.settings
    assert (s["training_method"], s["dim"], s["alpha"], s["conv_dim"]) == ("lora", 16, 1.0, 0)  # network_alpha 1
    assert (s["batch_size"], s["steps"], s["bucketing"], s["caption_ext"]) == (1, 1600, False, ".caption")
    assert (s["learning_rate"], s["text_encoder_lr"]) == (2e-6, 2e-6)  # the text encoder trains at learning_rate
    assert imported.taken == ["network_module", "network_dim"] and imported.not_taken == []
    assert "no max_train_steps or epochs → steps 1600 (sd-scripts' default)" in imported.changed


@pytest.mark.parametrize("given, expected", [
    ({"optimizer_type": "AdamW"}, "adamw"), ({"optimizer_type": "ADAMW8BIT"}, "adamw8bit"),
    ({"use_8bit_adam": True}, "adamw8bit"), ({"optimizer_type": "prodigy"}, "prodigy"),
    ({"optimizer_type": "Lion"}, "lion"), ({"use_lion_optimizer": True}, "lion"),
    ({"optimizer_type": "AdaFactor"}, "adafactor"), ({"optimizer_type": "PagedAdamW8bit"}, "adamw8bit"),
    ({"optimizer_type": "DAdaptAdam"}, "prodigy"), ({"optimizer_type": "SGDNesterov"}, None)])
def test_optimizer_names_are_taken_whatever_their_case(given, expected):
    imported = import_text(sd_scripts_config(learning_rate=1.0, **given))
    assert imported.settings.get("optimizer") == expected
    if expected is None:
        assert listed(imported, NO_EQUIVALENT) == {"optimizer_type": "SGDNesterov"}
    elif given.get("optimizer_type", "").lower() in ("pagedadamw8bit", "dadaptadam"):
        assert imported.changed[0].startswith(f"optimizer {given['optimizer_type']} → {expected} (")


@pytest.mark.parametrize("lines, expected, changed", [
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 1}, "cosine", False),
    ({"lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 4}, "cosine", True),
    ({"lr_scheduler": "polynomial", "lr_scheduler_power": 1.0}, "linear", False),
    ({"lr_scheduler": "polynomial", "lr_scheduler_power": 2.0}, None, False),
    ({"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 50}, "constant", False),
    ({"lr_scheduler": "adafactor", "optimizer_type": "Adafactor"}, "constant", False),
    ({"lr_scheduler": "linear", "optimizer_type": "Adafactor"}, "constant", True),  # kohya's adafactor schedule
    ({"lr_scheduler": "rex"}, None, False)])
def test_learning_rate_schedules(lines, expected, changed):
    imported = import_text(sd_scripts_config(max_train_steps=500, **lines))
    assert imported.settings.get("lr_scheduler") == expected
    assert bool(imported.changed) == changed
    if expected is None:  # the schedule and what it was given
        assert set(listed(imported, NO_EQUIVALENT)) == set(lines)
    if "lr_warmup_steps" in lines:
        assert imported.settings["lr_warmup_steps"] == 50


@pytest.mark.parametrize("module, args, expected", [
    ("lycoris.kohya", ["algo=locon"], {"training_method": "locon", "conv_dim": 8, "conv_alpha": 4.0,
                                       "network_targets": "full"}),  # LyCORIS: convs at the linear rank, preset full
    ("lycoris.kohya", ["algo=lora", "conv_dim=0", "preset=attn-only"], {"training_method": "lora", "conv_dim": 0,
                                                                         "network_targets": "attn-only"}),
    ("lycoris.kohya", ["algo=loha", "dora_wd=True"], {"training_method": "loha", "dora": True}),
    ("networks.lora", ["conv_dim=4", "conv_alpha=1"], {"training_method": "locon", "conv_dim": 4, "conv_alpha": 1.0}),
    ("networks.loha", [], {"training_method": "loha", "conv_dim": 0}),
    ("networks.lokr", ["factor=4"], {"training_method": "lokr", "lokr_factor": 4})])
def test_network_modules_and_their_arguments(module, args, expected):
    imported = import_text(sd_scripts_config(network_module=module, network_dim=8, network_alpha=4,
                                             network_args=args, learning_rate=1e-4))
    assert {k: imported.settings.get(k) for k in expected} == expected
    assert imported.complete().training_method == expected["training_method"]
    if "dora_wd=True" in args:  # LyCORIS' DoRA scale is per output channel unless told; lohatrain's per input
        assert "per input channel" in imported.changed[0]


def test_a_network_or_preset_lohatrain_lacks_is_listed():
    glora = import_text(sd_scripts_config(network_module="lycoris.kohya", network_dim=8,
                                          network_args=["algo=glora", "conv_dim=4"]))
    assert set(listed(glora, NO_EQUIVALENT)) == {"network_module", "network_dim", "network_args conv_dim"}
    preset = import_text(sd_scripts_config(network_module="lycoris.kohya", network_dim=8,
                                           network_args=["algo=loha", "preset=unet-transformer-only"]))
    assert listed(preset, NO_EQUIVALENT) == {"network_args preset": "unet-transformer-only"}
    assert "network_targets" not in preset.settings


def test_values_lohatrain_refuses_are_listed_and_left_out():
    imported = import_text(gui(LoRA_type="LyCORIS/LoHa", network_dim=5000, caption_extension=".txt-no",
                               conv_dim=4, conv_alpha=1))
    refused = listed(imported, REFUSED)
    assert refused == {"network_dim": 5000, "caption_extension": ".txt-no"}
    assert not {"dim", "caption_ext"} & set(imported.settings) and "caption_extension" not in imported.taken
    assert imported.complete().dim == TrainSettings.from_dict({"dataset_dir": "x", "training_method": "loha"}).dim


def test_text_that_is_no_kohya_config_is_refused_with_the_reason():
    with pytest.raises(SettingsError, match="not valid JSON"):
        import_text('{"LoRA_type": ')
    with pytest.raises(SettingsError, match="does not parse as TOML"):
        import_text("network_dim = = 4")
    with pytest.raises(SettingsError, match="does not exist"):
        import_file("/nonexistent/config.toml")


def test_the_command_line_trains_from_a_kohya_config_and_given_options_override(tmp_path, sample_dataset, capsys):
    config = tmp_path / "config.toml"
    config.write_text(sd_scripts_config(
        network_module="networks.lora", network_dim=4, network_alpha=2, learning_rate=1e-3, max_train_steps=3,
        train_batch_size=2, resolution="64,64", enable_bucket=True, min_bucket_reso=64, max_bucket_reso=128,
        caption_extension=".txt", mixed_precision="no", save_precision="fp16", seed=5, output_name="from-kohya",
        gradient_accumulation_steps=2), encoding="utf-8")
    code = main(["train", "--demo", "--kohya-config", str(config), "--dataset-dir", str(sample_dataset),
                 "--output-dir", str(tmp_path / "out"), "--learning-rate", "2e-3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Imported an sd-scripts config: 15 options taken, 1 not taken" in out
    assert "gradient_accumulation_steps = 2" in out
    with safe_open(str(tmp_path / "out" / "from-kohya.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4",
                                                                                            "2.0")
    assert (meta["ss_learning_rate"], meta["ss_steps"], meta["ss_seed"]) == ("0.002", "3", "5")
    assert (meta["ss_text_encoder_lr"], meta["ss_mixed_precision"]) == ("0.001", "fp32")


def test_the_command_line_refuses_a_kohya_config_with_another_settings_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--demo", "--kohya-config", str(DATA / "sd15-ia3.json"), "--config", "run.json"])
    assert "give --config or --kohya-config, not both" in capsys.readouterr().err


def test_kohya_over_rest_gives_settings_and_refuses_bad_bodies(webui_server):
    import httpx

    url = f"{webui_server.url}/lohatrain/v1/settings/import"
    r = httpx.post(url, json={"config": (DATA / "sd15-lokr-adafactor.json").read_text()})
    assert r.status_code == 200
    body = r.json()
    assert (body["settings"]["training_method"], body["settings"]["lokr_factor"]) == ("lokr", 8)
    assert body["message"].startswith("Imported a kohya_ss GUI config")
    assert body["not_taken"] == [{"group": NO_EQUIVALENT, "option": "decompose_both", "value": True, "why": ""},
                                 {"group": OWN_WAY, "option": "xformers", "value": "sdpa", "why": ""}]
    for bad, problem in (({"config": 3}, "config must be a text"), ({"config": "{oops"}, "not valid JSON"),
                         ({"toml": ""}, "unknown field 'toml'"), ([], "must be a JSON object")):
        r = httpx.post(url, json=bad)
        assert r.status_code == 422 and any(problem in p for p in r.json()["detail"]), r.json()


def test_kohya_form_settings_fill_the_tab_from_a_file(webui_server):
    from lohatrain.webui import actions

    settings, message = actions.kohya_form_settings(str(DATA / "sd15-standard-prodigy.json"))
    assert (settings.training_method, settings.dim, settings.optimizer, settings.dataset_dir) == ("lora", 32,
                                                                                                 "prodigy", "")
    assert message.startswith("Imported a kohya_ss GUI config: ") and "gradient_accumulation_steps = 2" in message
