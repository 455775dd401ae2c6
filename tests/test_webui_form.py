"""The tab's form without a browser: what an untouched form sends, what its Advanced panels send and how saved settings
and a kohya config fill them, and what picking an optimizer does to the rates. The browser tests
(tests/test_webui_browser.py) check the same on the page."""
from __future__ import annotations

import dataclasses

import gradio as gr
import httpx
import pytest

import webui_app  # noqa: F401  (puts the host stand-in on sys.path)

import lohatrain.webui
from lohatrain.settings import TrainSettings
from lohatrain.webui import actions, ui

from page import finished, run_body, wait_until

ADDED = [f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("recorded_when_set")]


def plain(values: list) -> list:
    """Form values as the page sends them back: an update's value."""
    return [v.get("value") if isinstance(v, dict) else v for v in values]


def test_the_form_has_a_field_for_every_setting_but_the_output_folder():
    assert sorted(ui.FIELDS) == sorted(f.name for f in dataclasses.fields(TrainSettings) if f.name != "output_dir")
    assert set(ADDED) <= set(ui.FIELDS)


def test_an_untouched_form_sends_the_engines_defaults(webui_server):
    """Every field at its default: the run's settings are the loaded family's and the host's defaults, so none of
    the Advanced panels' settings is recorded in the file (which stays byte-identical to a run before them)."""
    with gr.Blocks():
        tab = ui.lay_out(lohatrain.webui.runner())
    values = dict(zip(ui.FIELDS, [c.value for c in tab.fields(ui.FIELDS)]))
    values["dataset_dir"] = str(webui_server.root / "dataset")
    sent = ui.settings_from_form(list(values.values()))
    expected = dataclasses.replace(TrainSettings.defaults_for("sd1"), **actions.hosts.current().device_defaults(),
                                   dataset_dir=values["dataset_dir"], output_dir=str(webui_server.lora_dir),
                                   clip_skip=1)
    assert sent == expected
    assert not set(ADDED) & set(sent.recorded())


@pytest.mark.parametrize("advanced", [
    dict(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1.0, prodigy_d_coef=2.0,
         prodigy_bias_correction=True, prodigy_safeguard_warmup=True, weight_decay=0.05,
         optimizer_args="betas=0.9,0.99", network_targets="full", down_lr_weight="sine", mid_lr_weight="0.5",
         up_lr_weight="1,1,1,1,1,1,1,1,1,1,1,0", block_lr_zero_threshold=0.1, masked_loss=True,
         multires_noise_iterations=6, multires_noise_discount=0.2, ip_noise_gamma=0.1,
         debiased_estimation_loss=True, loss_type="smooth_l1", huber_schedule="exponential", huber_c=0.2,
         huber_scale=2.0, min_timestep=10, max_timestep=900, reg_data_dir="/data/class", prior_loss_weight=0.5,
         caption_dropout_rate=0.1, caption_tag_dropout_rate=0.2, keep_tokens_separator="|||"),
    dict(optimizer="adafactor", adafactor_relative_step=False, lr_scheduler="cosine"),
], ids=["prodigy-and-every-other-option", "adafactor-fixed-rate"])
def test_saved_settings_keep_every_advanced_field(webui_server, tmp_path, monkeypatch, advanced):
    """Save settings, then Load settings: the form sends the same settings again, each Advanced field included."""
    monkeypatch.setattr(ui, "SAVED_PRESETS_DIR", tmp_path)
    chosen = TrainSettings.from_dict({"name": "advanced", "dataset_dir": "/data/images",
                                      "output_dir": str(webui_server.lora_dir), "clip_skip": 2, **advanced})
    message, _ = ui.save_preset("advanced", *plain(ui.form_values(chosen)))
    assert "Saved settings as advanced" in message
    message, *values = ui.load_preset("advanced")
    assert "Loaded advanced" in message
    assert ui.settings_from_form(plain(values)) == chosen
    assert set(advanced) <= set(chosen.recorded())


def test_fields_of_another_optimizer_or_loss_are_left_out_of_the_run(webui_server):
    """A Prodigy option left set after AdamW is picked again, or a Huber option with the L2 loss, is hidden and
    keeps its default in the run."""
    chosen = TrainSettings.from_dict({"dataset_dir": "/data/images", "optimizer": "adamw", "loss_type": "l2"})
    values = dict(zip(ui.FIELDS, plain(ui.form_values(chosen))))
    values.update(prodigy_d_coef=3.0, adafactor_relative_step=False, huber_c=0.5, multires_noise_discount=0.5)
    sent = ui.settings_from_form(list(values.values()))
    assert (sent.prodigy_d_coef, sent.adafactor_relative_step, sent.huber_c, sent.multires_noise_discount) == (
        1.0, True, 0.1, 0.3)


def test_picking_an_optimizer_sets_the_learning_rates_it_wants_and_says_why(webui_server):
    loha, labels = ui.METHOD_LABELS["loha"], ui.OPTIMIZER_LABELS
    rate, encoder, note = ui.optimizer_changed(labels["prodigy"], loha, 1e-3, 5e-4)
    assert (rate, encoder) == (1.0, 1.0)  # Prodigy adapts one step size: the text encoder's rate is the same
    assert note["visible"] and note["value"].startswith("Learning rates set to 1, which is Prodigy's: it finds the "
                                                        "step size itself")
    assert ui.optimizer_changed(labels["adamw"], loha, 1.0, 1.0)[:2] == [1e-3, 1e-3]  # back to the type's rate
    rate, encoder, note = ui.optimizer_changed(labels["lion"], loha, 1e-3, 5e-4)
    assert (rate, encoder) == pytest.approx((1e-3 / 3, 5e-4 / 3))  # the text encoder's keeps its ratio
    assert "a third of the usual AdamW rate" in note["value"]
    assert ui.optimizer_changed(labels["prodigy"], loha, 1e-3, 0)[:2] == [1.0, 0]  # an untrained encoder stays so
    # another type picked while Prodigy is chosen keeps Prodigy's rate
    assert ui.method_changed(ui.METHOD_LABELS["lora"], labels["prodigy"])[ui.METHOD_FIELDS.index("learning_rate")] \
        == 1.0
    assert ui.method_changed(ui.METHOD_LABELS["lora"], labels["adamw"])[ui.METHOD_FIELDS.index("learning_rate")] \
        == 1e-4


KOHYA_TOML = """\
[model_arguments]
pretrained_model_name_or_path = "/models/sd15.safetensors"
[network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
network_args = ["down_lr_weight=sine", "mid_lr_weight=0.5"]
[optimizer_arguments]
optimizer_type = "Prodigy"
learning_rate = 1.0
optimizer_args = ["d_coef=2.0", "weight_decay=0.01"]
[training_arguments]
output_name = "from-kohya"
max_train_steps = 300
caption_dropout_rate = 0.1
loss_type = "huber"
huber_c = 0.2
gradient_accumulation_steps = 2
"""


def test_a_kohya_config_fills_the_form_and_says_what_was_not_taken(webui_server, tmp_path):
    """Every setting the config sets lands in its field (the Advanced panels' too); the dataset folder typed in the
    form stays when the config names none; the one message lists what was not taken."""
    config = tmp_path / "config.toml"
    config.write_text(KOHYA_TOML)
    message, *values = ui.load_kohya(str(config), None)
    assert "Imported an sd-scripts config" in message and "gradient_accumulation_steps = 2" in message
    assert values[ui.FIELDS.index("dataset_dir")] == gr.update()  # the folder in the form is kept
    values[ui.FIELDS.index("dataset_dir")] = "/data/images"
    imported, _ = actions.kohya_form_settings(str(config))
    sent = ui.settings_from_form(plain(values))
    expected = dataclasses.replace(imported, dataset_dir="/data/images", output_dir=str(webui_server.lora_dir),
                                   clip_skip=1)
    hidden = {name for name, rule in ui.APPLIES.items() if not rule.when(getattr(expected, rule.choice))}
    assert "conv_alpha" in hidden  # LoRA's: not sent, and not used
    assert {k: v for k, v in sent.to_dict().items() if k not in hidden} == {
        k: v for k, v in expected.to_dict().items() if k not in hidden}
    assert (sent.name, sent.optimizer, sent.prodigy_d_coef, sent.weight_decay, sent.down_lr_weight,
            sent.caption_dropout_rate, sent.loss_type, sent.huber_c, sent.steps) == (
        "from-kohya", "prodigy", 2.0, 0.01, "sine", 0.1, "huber", 0.2, 300)


def test_a_file_that_is_no_kohya_config_is_refused_and_the_form_kept(webui_server, tmp_path):
    config = tmp_path / "notes.toml"
    config.write_text("this is [not a config")
    message, *values = ui.load_kohya(str(config), None)
    assert "lohatrain-error" in message and values == [gr.update()] * len(ui.FIELDS)


@pytest.mark.parametrize("changes,problem", [
    (dict(learning_rate=-1e-4), "learning_rate must be above 0 and at most 1, not -0.0001"),
    (dict(optimizer_args="weight_decya=0.1"), "optimizer_args: adamw has no argument 'weight_decya' (did you mean "
                                               "weight_decay?)"),
    (dict(caption_dropout_rate=1.5), "caption_dropout_rate must be at least 0 and at most 1, not 1.5"),
    (dict(weight_decay="a lot"), 'weight_decay must be a number or null, not "a lot"'),  # typed into its text field
])
def test_train_with_a_bad_value_shows_the_same_message_as_rest(webui_server, changes, problem):
    """Train refuses what POST /train refuses (a 422), with the same message in the tab's message area."""
    body = run_body(webui_server, "bad-advanced", **changes)
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=body)
    assert r.status_code == 422 and any(p.startswith(problem) for p in r.json()["detail"]), r.json()
    form = TrainSettings.from_dict({k: v for k, v in body.items() if k not in changes})
    values = dict(zip(ui.FIELDS, plain(ui.form_values(form))), **changes)
    answer = ui.start_training(lohatrain.webui.runner(), *values.values())
    assert "lohatrain-error" in answer and ui.html.escape(problem) in answer
    assert not list(webui_server.lora_dir.glob("bad-advanced*"))



def test_fit_my_card_gives_the_form_values_train_accepts(webui_server, monkeypatch):
    """Fit my card's answer put into the form: the changed fields hold their new values, the others (the preset's
    dropdown included, which reForge and Forge showed holding an update inside an update) what they held, and Train
    then starts the run the recipe fits."""
    from lohatrain import memory

    form = TrainSettings.from_dict(run_body(webui_server, "fit-form", batch_size=2))
    values = plain(ui.form_values(form))
    free = actions.memory_estimate(dataclasses.replace(form, gradient_checkpointing=True), "tab").need
    monkeypatch.setattr(memory, "available_bytes", lambda parts: free)
    message, *updates = ui.fit_my_card(*values)
    assert "gradient_checkpointing → True" in message
    shown = [u["value"] if "value" in u else old for u, old in zip(updates, values)]
    assert [k for k, new, old in zip(ui.FIELDS, shown, values) if new != old] == ["gradient_checkpointing"]
    assert ui.settings_from_form(shown) == dataclasses.replace(ui.settings_from_form(values), gradient_checkpointing=True)
    answer = ui.start_training(lohatrain.webui.runner(), *shown)
    assert "started" in answer, answer
    assert wait_until(webui_server, finished)["state"] == "done"
