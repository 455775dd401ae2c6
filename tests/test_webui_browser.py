"""The tab in a real browser (Debian's headless Chromium via Playwright) on the page served by the host stand-in. The
steps and the checks the Forge page shares are in tests/tab.py."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import expect
from safetensors import safe_open

import webui_app  # noqa: F401  (puts the host stand-in on sys.path)
from modules import shared

from lohatrain.methods import TYPES
from lohatrain.settings import DEFAULT_PRESET, TrainSettings

from page import finished, run_body, wait_until
from runs import model_state
from tab import (TIMEOUT, check_a_clean_folder_and_apply_the_suggestion, check_loading_a_kohya_toml,
                 check_only_the_fields_that_apply_are_shown, check_the_doctor_lists_each_file_once,
                 expect_the_chart_and_the_preview, expect_the_last_run_after_a_reload, fill, fill_small_run,
                 open_accordion, open_the_tab, pick, pick_method, screenshot, train_then_interrupt,
                 wait_for_card_refresh)

ADVANCED = [f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("recorded_when_set")]


@pytest.fixture
def page(webui_server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(webui_server.url)
    open_the_tab(page)
    yield page
    page.close()


def test_training_from_the_tab_shows_progress_preview_and_the_file(page, webui_server, tmp_path):
    ui = webui_server
    before = model_state(shared.sd_model)
    fill_small_run(page, ui, "browser-loha", steps=12)
    open_accordion(page, "Previews")
    fill(page, "lohatrain_preview_every", 6)
    fill(page, "lohatrain_preview_prompt", "blue circle")
    fill(page, "lohatrain_preview_steps", 4)
    page.get_by_label("Save every N steps (0 = off)").fill("6")
    refreshes = len(webui_app.CARD_REFRESHES)
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_send")).to_be_disabled()  # no file to send while it trains
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text("started")
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("step", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_send")).to_be_enabled()
    expect(page.locator("#lohatrain_result")).to_contain_text("browser-loha.safetensors")
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("step 12/12")
    expect_the_chart_and_the_preview(page, steps=12, preview_step=12, prompt="blue circle")
    assert (ui.lora_dir / "browser-loha.safetensors").is_file()
    assert sorted(p.name for p in (ui.lora_dir / "browser-loha.previews").iterdir()) == [
        "step-000006.png", "step-000012.png"]
    assert model_state(shared.sd_model) == before
    with safe_open(str(ui.lora_dir / "browser-loha.safetensors"), "pt") as f:
        metadata = f.metadata()
    # the Advanced panels untouched: none of their settings recorded, the file as before they existed
    assert metadata["ss_optimizer"] == "torch.optim.AdamW"
    assert not set(ADVANCED) & set(json.loads(metadata["lohatrain_settings"]))
    screenshot(page, "screenshot.png")  # the README's picture of the tab after a run

    wait_for_card_refresh(page, refreshes)

    open_accordion(page, "Steps × strength grid of the trained file")
    page.locator("#lohatrain_grid").click()
    expect(page.locator("div.prose#lohatrain_grid_message")).to_contain_text("Saved browser-loha.grid.png",
                                                                              timeout=TIMEOUT)
    expect(page.locator("#lohatrain_grid_images img").first).to_be_visible()
    assert (ui.lora_dir / "browser-loha.grid.png").is_file()
    screenshot(page, "grid.png", "#lohatrain_grid_box")

    page.locator("#lohatrain_send").click()
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()
    # the tag and the card's activation text: the first tag most captions share
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("<lora:browser-loha:1>, black triangle")

    expect_the_last_run_after_a_reload(page, "browser-loha", steps=12)


def test_interrupt_button_stops_within_a_step(page, webui_server):
    train_then_interrupt(page, webui_server, "browser-stopped", steps=5000)
    expect(page.locator("#lohatrain_result")).to_contain_text("Interrupted after")
    assert (webui_server.lora_dir / "browser-stopped.safetensors").is_file()


def test_an_interrupted_run_is_listed_under_resume_and_resuming_finishes_it(page, webui_server):
    train_then_interrupt(page, webui_server, "browser-resume", steps=20)
    open_accordion(page, "Resume a stopped run, or train a file further")
    with page.expect_response(lambda r: r.url.endswith("/run/predict") and r.ok):  # the list is read again
        page.locator("#lohatrain_refresh_runs").click()
    page.locator("#lohatrain_resume_run input").click()
    page.locator("ul.options li", has_text=re.compile(r"browser-resume — step \d+/20")).first.click()
    page.locator("#lohatrain_resume").click()
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text("Resuming browser-resume at step")
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("step 20/20")
    assert not (webui_server.lora_dir / "browser-resume.lohatrain-state").exists()


def test_caption_a_folder_with_the_webuis_tagger_and_edit_one_caption(page, webui_server):
    folder = webui_server.root / "to-caption"
    folder.mkdir()
    for image in sorted((webui_server.root / "dataset").glob("*.png"))[:4]:
        shutil.copy(image, folder)
    fill(page, "lohatrain_dataset", folder)
    open_accordion(page, "Caption the images with the WebUI's taggers")
    fill(page, "lohatrain_caption_prefix", "mychar")
    page.locator("#lohatrain_caption").click()
    expect(page.locator("div.prose#lohatrain_caption_message")).to_contain_text("Wrote 4 caption(s), kept 0.",
                                                                        timeout=TIMEOUT)
    written = sorted(folder.glob("*.txt"))
    assert len(written) == 4 and all(p.read_text(encoding="utf-8").startswith("mychar, ") for p in written)
    expect(page.locator("#lohatrain_thumbs img")).to_have_count(4)
    screenshot(page, "caption.png", "#lohatrain_caption_box")

    page.locator("#lohatrain_thumbs button.thumbnail-item").nth(1).click()
    expect(page.locator("#lohatrain_edit_name textarea")).to_have_value(written[1].with_suffix(".png").name)
    expect(page.locator("#lohatrain_edit_caption textarea")).to_have_value(written[1].read_text(encoding="utf-8"))
    fill(page, "lohatrain_edit_caption", "mychar, edited by hand")
    page.locator("#lohatrain_save_caption").click()
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text(f"Saved {written[1].name}.")
    assert written[1].read_text(encoding="utf-8") == "mychar, edited by hand"


def test_check_dataset_shows_count_buckets_thumbnails_and_applies_the_suggestion(page, webui_server):
    check_a_clean_folder_and_apply_the_suggestion(page, webui_server.root / "dataset")


def test_the_doctor_lists_each_problem_once_with_its_files(page, webui_server):
    check_the_doctor_lists_each_file_once(page, webui_server.root / "doctor-case")


def test_only_the_fields_that_apply_are_shown(page):
    check_only_the_fields_that_apply_are_shown(page)


@pytest.mark.parametrize("case,message", [
    ("no folder", "dataset_dir: choose the folder"),
    ("bad name", "must be a plain file name"),
    ("missing captions", "caption file(s) are missing"),
    ("negative rate", "learning_rate must be above 0 and at most 1, not -0.0001"),
    ("unknown optimizer argument", "optimizer_args: adamw has no argument 'weight_decya' (did you mean weight_decay?)"),
])
def test_bad_input_gets_a_clear_message(page, webui_server, tmp_path, case, message):
    """The message of each refusal is the one a REST call gets in its 422 (tests/test_webui_form.py compares them)."""
    fill_small_run(page, webui_server, "bad-input", steps=3)
    if case == "no folder":
        fill(page, "lohatrain_dataset", "")
    elif case == "bad name":
        fill(page, "lohatrain_name", "../../outside")
    elif case == "negative rate":
        fill(page, "lohatrain_lr", -0.0001)
    elif case == "unknown optimizer argument":
        open_accordion(page, "Advanced: optimizer")
        fill(page, "lohatrain_optimizer_args", "weight_decya=0.1")
    else:
        for image in (webui_server.root / "dataset").glob("*.png"):
            shutil.copy(image, tmp_path / image.name)
        fill(page, "lohatrain_dataset", tmp_path)
    page.locator("#lohatrain_train").click()
    # every case is refused before a job starts (the dataset too: the preflight reads it), and the panel says
    # nothing of an earlier job
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text(message)
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_count(0)
    assert not (webui_server.lora_dir / "bad-input.safetensors").exists()
    assert not Path(webui_server.root / "outside.safetensors").exists()


def test_send_names_the_project_names_file_when_the_panel_shows_no_run(page, webui_server):
    """With no run shown (here a refused Train hides the last one), Send to txt2img follows the project name: off
    for a name without a file, on once the name is one of the Lora folder's files."""
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(webui_server.lora_dir / "on-disk.safetensors"))
    fill_small_run(page, webui_server, "not-on-disk", steps=3)
    fill(page, "lohatrain_dataset", "")
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_message").first).to_contain_text("dataset_dir: choose the folder")
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_count(0)
    expect(page.locator("#lohatrain_send")).to_be_disabled()
    fill(page, "lohatrain_name", "on-disk")
    expect(page.locator("#lohatrain_send")).to_be_enabled()
    page.locator("#lohatrain_send").click()
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("<lora:on-disk:1>")


def test_saved_settings_of_another_type_load_with_their_preset_sizes_and_rate(page, webui_server, tmp_path,
                                                                             monkeypatch):
    """Loading settings of a LoKr while LoHa is shown keeps the file's preset, factor and rate (the type's defaults
    follow the user's pick only), and DoRA, which LoKr cannot have, is hidden; back to LoHa settings, it shows."""
    monkeypatch.setattr("lohatrain.webui.ui.SAVED_PRESETS_DIR", tmp_path)
    fill_small_run(page, webui_server, "lokr-saved", steps=3)
    pick_method(page, "LoKr")
    page.locator("#lohatrain_preset input").click()
    page.locator("ul.options li", has_text="Medium").first.click()
    expect(page.locator("#lohatrain_lokr_factor input")).to_have_value("8")
    fill(page, "lohatrain_lr", 0.0005)
    fill(page, "lohatrain_saved_name", "lokr-style")
    page.locator("#lohatrain_save_settings").click()
    expect(page.locator("#lohatrain_message").first).to_contain_text("Saved settings as lokr-style")
    pick_method(page, "LoHa")
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.001")
    expect(page.locator("#lohatrain_dora")).to_be_visible()
    page.locator("#lohatrain_load_settings").click()
    expect(page.locator("#lohatrain_message").first).to_contain_text("Loaded lokr-style")
    expect(page.locator("#lohatrain_method input")).to_have_value("LoKr")
    expect(page.locator("#lohatrain_preset input")).to_have_value(re.compile(r"^Medium: factor 8"))
    expect(page.locator("#lohatrain_lokr_factor input")).to_have_value("8")
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.0005")
    expect(page.locator("#lohatrain_steps input")).to_have_value("3")
    expect(page.locator("#lohatrain_dora")).to_be_hidden()
    page.locator("#lohatrain_train").click()  # the loaded settings train as saved
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    from safetensors import safe_open
    with safe_open(str(webui_server.lora_dir / "lokr-saved.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_learning_rate"], metadata["ss_network_args"].count('"factor": "8"')) == ("0.0005", 1)


def test_settings_can_be_saved_and_loaded_by_name(page, webui_server, tmp_path, monkeypatch):
    monkeypatch.setattr("lohatrain.webui.ui.SAVED_PRESETS_DIR", tmp_path)
    fill_small_run(page, webui_server, "saved-run", steps=77)
    fill(page, "lohatrain_saved_name", "my-style")
    page.locator("#lohatrain_save_settings").click()
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text("Saved settings as my-style")
    fill(page, "lohatrain_steps", 5)
    fill(page, "lohatrain_name", "other")
    page.locator("#lohatrain_load_settings").click()
    expect(page.locator("div.prose#lohatrain_message")).to_contain_text("Loaded my-style")
    expect(page.locator("#lohatrain_steps input")).to_have_value("77")
    expect(page.locator("#lohatrain_name textarea")).to_have_value("saved-run")
    assert (tmp_path / "my-style.json").is_file()


def test_fit_my_card_changes_the_forms_fields_and_says_what_it_changed(page, webui_server, monkeypatch):
    """Beside Train: on a card nothing fits (its free memory is the one thing this CPU machine lacks), the form
    gets every change that lowers the need (checkpointing, batch size 1) and the message says what it still
    needs; the fields it does not change keep what the user typed."""
    from lohatrain import memory
    from lohatrain.webui import actions

    monkeypatch.setattr(memory, "available_bytes", lambda parts: 1)
    # the 8-bit optimizer left out whichever bitsandbytes is installed (it is not a field of the form everywhere)
    monkeypatch.setattr(actions, "_why_no_8bit", lambda device: "no 8-bit kernels for it")
    fill_small_run(page, webui_server, "fit-run", steps=33)
    page.locator("#lohatrain_fit").click()
    message = page.locator("div.prose#lohatrain_message")
    expect(message).to_contain_text("Fit my card: the run needs ≈", timeout=TIMEOUT)
    expect(message).to_contain_text("Even with gradient checkpointing on")
    expect(message).to_contain_text("Changed in the form: gradient_checkpointing → True, batch_size → 1.")
    expect(page.get_by_label("Gradient checkpointing")).to_be_checked()
    expect(page.locator("#lohatrain_batch_size input[type=number]")).to_have_value("1")
    expect(page.locator("#lohatrain_steps input")).to_have_value("33")
    expect(page.locator("#lohatrain_preset input")).to_have_value(re.compile(r"^Small"))  # not blanked by Fit
    assert not (webui_server.lora_dir / "fit-run.safetensors").exists()


def test_base_model_dropdown_loads_another_checkpoint_through_the_host(page, webui_server):
    from safetensors.torch import save_file

    import lohatrain.demo
    from modules import sd_models

    ckpt_dir = Path(shared.cmd_opts.ckpt_dir)
    save_file(lohatrain.demo.build_tiny_sd1(1).state_dict(), str(ckpt_dir / "other-sd1.safetensors"))
    try:
        load_checkpoint_from_the_tab(page, "other-sd1")
        expect(page.locator("div.prose#lohatrain_model")).to_contain_text("other-sd1", timeout=TIMEOUT)
        assert shared.sd_model.sd_checkpoint_info.name == "other-sd1.safetensors"
        expect(page.locator("#lohatrain_resolution input[type=number]")).to_have_value("512")  # same family
    finally:
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-sd1"))


def load_checkpoint_from_the_tab(page, name: str) -> None:
    option = page.locator("ul.options li", has_text=name).first
    for _ in range(20):  # the refreshed choices arrive asynchronously: refresh and reopen until they are in
        page.locator("#lohatrain_refresh_checkpoints").click()
        page.locator("#lohatrain_checkpoint input").click()
        try:
            option.wait_for(state="visible", timeout=1500)
            break
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    option.click()
    page.locator("#lohatrain_load_checkpoint").click()


def test_with_an_sdxl_checkpoint_loaded_the_tab_switches_defaults_and_trains_it(page, webui_server):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lohatrain.demo_sdxl import build_tiny_sdxl
    from modules import sd_models

    ui = webui_server
    save_file(build_tiny_sdxl(0).state_dict(), str(Path(shared.cmd_opts.ckpt_dir) / "tiny-sdxl.safetensors"))
    try:
        load_checkpoint_from_the_tab(page, "tiny-sdxl")
        expect(page.locator("div.prose#lohatrain_model")).to_contain_text("SDXL", timeout=TIMEOUT)
        expect(page.locator("div.prose#lohatrain_message")).to_contain_text("SDXL's defaults")
        expect(page.locator("#lohatrain_resolution input[type=number]")).to_have_value("1024")
        expect(page.locator("#lohatrain_preset input")).to_have_value(re.compile(r"Highest.*MB on SDXL"))
        assert shared.sd_model.is_sdxl
        before = model_state(shared.sd_model)

        fill_small_run(page, ui, "browser-xl", steps=4)
        open_accordion(page, "Previews")
        fill(page, "lohatrain_preview_every", 4)
        fill(page, "lohatrain_preview_prompt", "blue circle")
        page.locator("#lohatrain_train").click()
        expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done",
                                                                                   timeout=TIMEOUT)
        expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("step 4/4")
        expect(page.locator("#lohatrain_live img.lohatrain-preview")).to_be_visible()
        with safe_open(str(ui.lora_dir / "browser-xl.safetensors"), "pt") as f:
            assert f.metadata()["ss_base_model_version"].startswith("sdxl_")
            assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in f.keys())
        assert model_state(shared.sd_model) == before
    finally:
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-sd1"))


def test_the_panel_follows_the_job_it_started_not_the_last_one(page, webui_server, monkeypatch):
    """An earlier job (here through the REST API) has ended; Train's own checks take a while before the new
    job exists. The panel must not stop on the earlier job's end: it follows the job Train started, by id."""
    import threading

    import httpx

    from lohatrain.webui import ui as tab


    httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "earlier", steps=1))
    assert wait_until(webui_server, finished)["state"] == "done"
    release = threading.Event()
    real_preflight = tab.actions.preflight

    def slow_preflight(settings, via, **kwargs):
        assert release.wait(120)
        return real_preflight(settings, via, **kwargs)

    monkeypatch.setattr(tab.actions, "preflight", slow_preflight)
    fill_small_run(page, webui_server, "followed", steps=3)
    page.locator("#lohatrain_train").click()
    # while the new job is still being checked, the panel waits for it, not showing the earlier job's end
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("Starting", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "running")
    release.set()
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text("step 3/3", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    assert (webui_server.lora_dir / "followed.safetensors").is_file()


# One type other than the default LoHa: the dropdown's value is all the tab adds (each type: test_methods.py)
@pytest.mark.parametrize("method,label,key_suffix", [("lokr", "LoKr", "lokr_w1")])
def test_another_training_method_from_the_tab(page, webui_server, method, label, key_suffix):
    """Choosing the type switches the presets (and their sizes) and the learning rate; the file is that type."""
    from safetensors.torch import load_file

    fill_small_run(page, webui_server, f"tab-{method}", steps=3)
    page.locator("#lohatrain_method input").click()
    page.locator("ul.options li", has_text=label).first.click()
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.0001" if method == "lora" else "0.001")
    # the type's own presets are in before one is picked (the type's change answers after the click otherwise)
    expect(page.locator("#lohatrain_preset input")).to_have_value(
        re.compile("^" + re.escape(TYPES[method].presets["sd1"][DEFAULT_PRESET].label)))
    page.locator("#lohatrain_preset input").click()
    page.locator("ul.options li", has_text="Small").first.click()
    if method == "lokr":
        expect(page.locator("#lohatrain_lokr_factor input")).to_have_value("16")
        expect(page.locator("#lohatrain_dora")).to_be_hidden()
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_result")).to_contain_text(f"tab-{method}.safetensors")
    tensors = load_file(webui_server.lora_dir / f"tab-{method}.safetensors")
    assert any(k.endswith(key_suffix) for k in tensors) and not any("hada_" in k for k in tensors)


def test_a_run_with_advanced_options_records_them_as_kohya_does(page, webui_server):
    """Prodigy (its d_coef) and caption dropout chosen in the Advanced panels: the file's metadata says so under
    kohya's keys, and the form's learning rate is Prodigy's."""
    fill_small_run(page, webui_server, "advanced-run", steps=3)
    open_accordion(page, "Advanced: optimizer")
    pick(page, "lohatrain_optimizer", "Prodigy")
    fill(page, "lohatrain_prodigy_d_coef", 2)
    open_accordion(page, "Advanced: dataset options")
    fill(page, "lohatrain_caption_dropout_rate", 0.25)
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    with safe_open(str(webui_server.lora_dir / "advanced-run.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert (metadata["ss_optimizer"], metadata["ss_caption_dropout_rate"], metadata["ss_learning_rate"]) == (
        "prodigyopt.prodigy.Prodigy(d_coef=2.0)", "0.25", "1.0")
    assert "lohatrain_prodigy_d" in metadata  # the step size Prodigy found


def test_loading_a_kohya_toml_fills_the_form_and_lists_what_was_not_taken(page, webui_server, tmp_path):
    check_loading_a_kohya_toml(page, webui_server.root / "dataset", tmp_path)


def test_check_dataset_reports_the_regularization_folder(page, webui_server):
    from lohatrain.demo import make_sample_dataset

    regularization = make_sample_dataset(webui_server.root / "class-images", seed=1)
    fill(page, "lohatrain_dataset", webui_server.root / "dataset")
    fill(page, "lohatrain_resolution", 256)
    open_accordion(page, "Advanced: dataset options")
    fill(page, "lohatrain_reg_data_dir", regularization)
    page.locator("#lohatrain_check").click()
    report = page.locator("#lohatrain_report").first
    expect(report).to_contain_text("8 images, 8 with a caption, and 8 regularization images")
    expect(report.locator("table.lohatrain-folders")).to_contain_text("(regularization)")


def test_the_clip_skip_slider_shows_the_webuis_setting_at_each_page_load(browser, webui_server):
    page = browser.new_page()
    try:
        shared.opts.CLIP_stop_at_last_layers = 2
        page.goto(webui_server.url)
        page.locator("#tabs button", has_text="LoRA training").click()
        expect(page.locator("#lohatrain_clip_skip input[type=number]")).to_have_value("2")
    finally:
        shared.opts.CLIP_stop_at_last_layers = 1
        page.close()
