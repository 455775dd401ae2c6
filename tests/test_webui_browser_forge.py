"""The tab on a Forge 2 host under Forge's Gradio 4.40, in a real browser (Debian's Chromium via Playwright), and
the REST routes on Forge's web stack.

Runs in .venv-gradio4 (`make test-gradio4`); under the WebUI v1.10.1's Gradio 3.41 (.venv) it is skipped, and
tests/test_webui_browser.py covers the tab there. The page is tests/webui_app.py's as a Forge host: lohatrain's
Forge adapter trains the Forge stand-in's engine (tests/forge_stub) in place, and previews and the grid go through
the stand-in's Forge txt2img and Lora extension."""
from __future__ import annotations

import re
import sys

import pytest

gradio = pytest.importorskip("gradio")
if int(gradio.__version__.split(".")[0]) < 4:
    pytest.skip("Forge 2's Gradio 4 page: run in .venv-gradio4 (make test-gradio4)", allow_module_level=True)

import httpx  # noqa: E402
from playwright.sync_api import expect  # noqa: E402
from safetensors import safe_open  # noqa: E402

import webui_app  # noqa: E402  (puts the host stand-in on sys.path)
from lohatrain.demo import make_sample_dataset  # noqa: E402
from modules import shared  # noqa: E402
from forge_env import forge_state  # noqa: E402
from page import finished, rest_behind_gradio_auth, run_body, wait_until  # noqa: E402
from tab import (TIMEOUT, check_a_clean_folder_and_apply_the_suggestion, check_loading_a_kohya_toml,  # noqa: E402
                 check_only_the_fields_that_apply_are_shown, check_the_doctor_lists_each_file_once,
                 expect_the_chart_and_the_preview, expect_the_last_run_after_a_reload, fill, fill_small_run,
                 open_accordion, open_the_tab, screenshot, train_then_interrupt, wait_for_card_refresh)


@pytest.fixture(scope="module")
def forge_webui(tmp_path_factory):
    ui = webui_app.start(tmp_path_factory.mktemp("forge-webui"), forge=True)
    make_sample_dataset(ui.root / "dataset")
    yield ui
    ui.close()


@pytest.fixture
def page(forge_webui, browser):
    """The tab opened, with the page's JavaScript errors collected: a test ends by checking there were none.
    Gradio 4's page also fetches fonts and a script from the internet; here they are answered empty, so that
    a machine without the internet logs no errors for them."""
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.route(lambda url: not url.startswith(forge_webui.url), lambda route: route.fulfill(
        status=200, body="", content_type="text/css" if "css" in route.request.url else "application/javascript"))
    page.js_errors = []
    page.on("pageerror", lambda error: page.js_errors.append(str(error)))
    page.on("console", lambda message: page.js_errors.append(f"{message.text} @ {message.location.get('url')}")
            if message.type == "error" else None)
    page.goto(forge_webui.url)
    open_the_tab(page)
    yield page
    page.close()


def test_the_tab_loads_and_says_what_forge_cannot_do(page, forge_webui):
    assert type(shared.sd_model).__module__.startswith("backend.")  # Forge's engine, not an ldm model
    summary = page.locator("#lohatrain_model")
    expect(summary).to_contain_text("tiny-sd1")
    expect(summary).to_contain_text("SD 1")
    expect(summary).to_contain_text("the text encoder is not trained")
    # Gradio 4's gallery: the thumbnails served, and a clicked one's caption (its select event) ready to edit
    fill(page, "lohatrain_dataset", forge_webui.root / "dataset")
    page.locator("#lohatrain_check").click()
    expect(page.locator("#lohatrain_report")).to_contain_text("8 images, 8 with a caption")
    expect(page.locator("#lohatrain_thumbs img")).to_have_count(8)
    page.locator("#lohatrain_thumbs button.thumbnail-item").nth(1).click()
    expect(page.locator("#lohatrain_edit_name textarea")).to_have_value("sample_01.png")
    caption = (forge_webui.root / "dataset" / "sample_01.txt").read_text(encoding="utf-8").strip()
    expect(page.locator("#lohatrain_edit_caption textarea")).to_have_value(caption)
    assert page.js_errors == []


def test_training_on_forge_shows_progress_a_preview_the_grid_and_sends_to_txt2img(page, forge_webui):
    ui = forge_webui
    before = forge_state(shared.sd_model)
    fill_small_run(page, ui, "forge-loha", steps=3)
    expect(page.locator("#lohatrain_send")).to_be_disabled()  # no forge-loha.safetensors yet
    open_accordion(page, "Previews")
    fill(page, "lohatrain_preview_every", 3)
    fill(page, "lohatrain_preview_prompt", "blue circle")
    fill(page, "lohatrain_preview_steps", 2)
    refreshes = len(webui_app.CARD_REFRESHES)
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_message")).to_contain_text("started")
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text(re.compile(r"step 3/3 · loss \d"))
    expect_the_chart_and_the_preview(page, steps=3, preview_step=3, prompt="blue circle")  # by Forge's txt2img
    assert [p.name for p in (ui.lora_dir / "forge-loha.previews").iterdir()] == ["step-000003.png"]
    expect(page.locator("#lohatrain_result")).to_contain_text("forge-loha.safetensors")
    expect(page.locator("#lohatrain_send")).to_be_enabled()
    screenshot(page, "screenshot-forge.png")  # the README's picture of the tab in Forge after a run
    with safe_open(str(ui.lora_dir / "forge-loha.safetensors"), "pt") as f:
        assert any(k.startswith("lora_unet_") and k.endswith("hada_w1_a") for k in f.keys())
    assert forge_state(shared.sd_model) == before
    wait_for_card_refresh(page, refreshes)

    open_accordion(page, "Steps × strength grid of the trained file")
    fill(page, "lohatrain_grid_strengths", "1")
    page.locator("#lohatrain_grid").click()
    expect(page.locator("#lohatrain_grid_message")).to_contain_text("Saved forge-loha.grid.png", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_grid_images img").first).to_be_visible()
    assert (ui.lora_dir / "forge-loha.grid.png").is_file()
    assert forge_state(shared.sd_model) == before

    page.locator("#lohatrain_send").click()
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()
    expect(page.locator("#txt2img_prompt textarea")).to_have_value(re.compile(r"^<lora:forge-loha:1>"))
    expect_the_last_run_after_a_reload(page, "forge-loha", steps=3)
    assert page.js_errors == []


def test_the_base_model_list_is_forges_and_the_model_line_follows_the_model_a_generation_or_a_run_loads(
        page, forge_webui):
    """The Base model list is Forge's top bar's (its names); before Forge loads the chosen checkpoint the model line
    says so, and it shows the model once a generation loaded it (when the tab is shown again) or a run did."""
    from modules import sd_models
    from modules_forge import main_entry

    page.locator("#lohatrain_checkpoint input").click()
    expect(page.locator("ul.options li")).to_have_count(len(main_entry.refresh_models()[0]))
    # each option's text ends with its name (Gradio puts a check mark before the chosen one)
    assert [li.inner_text().split()[-1] for li in page.locator("ul.options li").all()] == list(
        main_entry.refresh_models()[0]) == ["tiny-sd1.safetensors"]
    page.keyboard.press("Escape")
    summary = page.locator("#lohatrain_model")

    def as_forge_starts() -> None:  # the chosen checkpoint is loaded at the first generation or run
        sd_models.model_data.set_sd_model(sd_models.FakeInitialModel())
        sd_models.model_data.forge_hash = ""
        page.reload()
        open_the_tab(page)
        expect(summary).to_contain_text("it is not loaded yet")

    as_forge_starts()
    sd_models.forge_model_reload()  # what txt2img does first
    page.get_by_role("tab", name="txt2img").click()
    open_the_tab(page)
    expect(summary).to_contain_text("tiny-sd1")
    expect(summary).to_contain_text("SD 1.x")
    expect(page.locator("#lohatrain_checkpoint input")).to_have_value("tiny-sd1.safetensors")

    as_forge_starts()
    fill_small_run(page, forge_webui, "forge-lazy", steps=2)
    page.locator("#lohatrain_train").click()
    expect(summary).to_contain_text("SD 1.x", timeout=TIMEOUT)  # while the run goes on, or once it is done
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(summary).not_to_contain_text("not loaded yet")
    assert shared.sd_model.sd_checkpoint_info.name == "tiny-sd1.safetensors"
    assert page.js_errors == []


def test_only_the_fields_that_apply_are_shown_on_forge(page):
    check_only_the_fields_that_apply_are_shown(page)
    assert page.js_errors == []


def test_a_kohya_config_loads_into_the_form_on_forge(page, forge_webui, tmp_path):
    check_loading_a_kohya_toml(page, forge_webui.root / "dataset", tmp_path)  # Gradio 4's upload: a path
    assert page.js_errors == []


def test_check_dataset_on_forge_shows_the_folder_and_applies_its_suggestion(page, forge_webui):
    check_a_clean_folder_and_apply_the_suggestion(page, forge_webui.root / "dataset")
    assert page.js_errors == []


def test_the_doctor_on_forge_lists_each_problem_once_with_its_files(page, forge_webui):
    check_the_doctor_lists_each_file_once(page, forge_webui.root / "doctor-case")
    assert page.js_errors == []


def test_interrupt_on_forge_stops_the_run_and_saves_a_whole_file(page, forge_webui):
    ui = forge_webui
    before = forge_state(shared.sd_model)
    train_then_interrupt(page, ui, "forge-stopped", steps=5000)
    expect(page.locator("#lohatrain_result")).to_contain_text("Interrupted after")
    stopped_at = int(re.search(r"step (\d+)/", page.locator("#lohatrain_live .lohatrain-numbers").inner_text())[1])
    with safe_open(str(ui.lora_dir / "forge-stopped.safetensors"), "pt") as f:
        assert int(f.metadata()["ss_steps"]) == stopped_at
    assert not [p.name for p in ui.lora_dir.iterdir() if p.name.startswith("forge-stopped") and ".tmp" in p.name]
    assert forge_state(shared.sd_model) == before
    assert page.js_errors == []


def test_the_rest_routes_on_forges_web_stack(forge_webui, monkeypatch):
    """FastAPI 0.104 and pydantic 2 (Forge's pins): the body's problems listed, a run through the routes on Forge's
    model, and the page's login cookie behind --gradio-auth."""
    ui = forge_webui
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "../escape", steps=0, train_dtype="fp8"))
    assert r.status_code == 422 and [p.split()[0] for p in r.json()["detail"]] == ["name", "steps", "train_dtype"]
    before = forge_state(shared.sd_model)
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "forge-rest", steps=2))
    assert r.status_code == 200
    status = wait_until(ui, finished)
    assert status["state"] == "done" and len(status["losses"]) == 2, status["message"]
    assert (ui.lora_dir / "forge-rest.safetensors").is_file()
    assert "forge-rest" in sys.modules["networks"].available_networks  # Forge's Lora extension's list was refreshed
    assert forge_state(shared.sd_model) == before
    rest_behind_gradio_auth(ui, monkeypatch)
