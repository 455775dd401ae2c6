"""The tab in the browser as tests drive it (Playwright): opening it, filling a small run, picking a dropdown's
option, a run interrupted from it, what a finished run shows; and the checks both hosts' pages share (the A1111
page in tests/test_webui_browser.py, the Forge page in tests/test_webui_browser_forge.py): the dataset check and its
suggestion, the doctor's list, the fields each choice shows, a kohya TOML loaded into the form."""
from __future__ import annotations

import os
import re
from pathlib import Path

from playwright.sync_api import expect

import webui_app

TIMEOUT = 180_000  # ms; a bound on waiting for a state, never a timing
ADVANCED_PANELS = {"Advanced: optimizer": "lohatrain_optimizer",
                   "Advanced: network targets and block weights": "lohatrain_network_targets",
                   "Advanced: loss and noise": "lohatrain_masked_loss",
                   "Advanced: dataset options": "lohatrain_reg_data_dir"}  # each panel's title and first field


def open_the_tab(page) -> None:
    page.locator("#tabs button", has_text="LoRA training").click()
    expect(page.locator("#lohatrain_train")).to_be_visible()


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number]").first.fill(str(value))


def open_accordion(page, title: str) -> None:
    page.get_by_text(title, exact=True).click()


def pick(page, elem_id: str, label: str) -> None:
    """Choose a dropdown's option by its label."""
    page.locator(f"#{elem_id} input").click()
    # the option's text ends with its label (Gradio 3 puts a hidden check mark before it)
    page.locator("ul.options li", has_text=re.compile(rf"(^|\W){re.escape(label)}\s*$")).first.click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(label)


def pick_method(page, label: str) -> None:
    pick(page, "lohatrain_method", label)


def fill_small_run(page, ui, name: str, steps: int) -> None:
    fill(page, "lohatrain_name", name)
    fill(page, "lohatrain_dataset", ui.root / "dataset")
    page.locator("#lohatrain_caption_mode label", has_text="TXT captions").click()
    fill(page, "lohatrain_resolution", 64)
    fill(page, "lohatrain_steps", steps)
    fill(page, "lohatrain_batch_size", 2)
    page.locator("#lohatrain_preset input").click()
    page.locator("ul.options li", has_text="Small").first.click()
    open_accordion(page, "Developer options")
    page.locator("#lohatrain_train_dtype label", has_text="fp32").click()
    fill(page, "lohatrain_bucket_min", 64)
    fill(page, "lohatrain_bucket_max", 128)
    page.get_by_label("Gradient checkpointing").uncheck()
    page.get_by_label("Overwrite an existing file").check()


def wait_for_card_refresh(page, refreshes: int) -> None:
    """The Lora cards were told to read the folder again since `refreshes` were counted (a bounded wait)."""
    for _ in range(TIMEOUT // 50):
        if len(webui_app.CARD_REFRESHES) > refreshes:
            break
        page.wait_for_timeout(50)
    assert len(webui_app.CARD_REFRESHES) > refreshes


def train_then_interrupt(page, ui, name: str, steps: int) -> None:
    """Train from the tab, press Interrupt once two steps are shown, and wait for the run to say so."""
    fill_small_run(page, ui, name, steps=steps)
    page.locator("#lohatrain_train").click()
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text(
        re.compile(rf"step ([2-9]|\d\d+)/{steps}"), timeout=TIMEOUT)
    page.locator("#lohatrain_interrupt").click()
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute(
        "data-state", "interrupted", timeout=TIMEOUT)


def expect_the_chart_and_the_preview(page, steps: int, preview_step: int, prompt: str) -> None:
    """The loss chart over its step axis (the last step labelled), with the smoothed curve; the preview captioned
    with its step and prompt."""
    chart = page.locator("#lohatrain_live")
    expect(chart.locator("svg.lohatrain-chart polyline.lohatrain-loss")).to_be_visible()
    expect(chart.locator("svg.lohatrain-chart polyline.lohatrain-smooth")).to_be_visible()
    expect(chart.locator(".lohatrain-chart-steps span").last).to_have_text(str(steps))
    expect(chart.locator(".lohatrain-chart-legend")).to_contain_text("smoothed loss")
    expect(chart.locator("img.lohatrain-preview")).to_be_visible()
    expect(chart.locator("figcaption")).to_have_text(f"Preview at step {preview_step}: “{prompt}”")


def expect_the_last_run_after_a_reload(page, name: str, steps: int) -> None:
    """A new page shows the run that finished: its result, chart and preview, and Send names its file."""
    page.reload()
    open_the_tab(page)
    expect(page.locator("#lohatrain_live .lohatrain-state")).to_have_attribute("data-state", "done", timeout=TIMEOUT)
    expect(page.locator("#lohatrain_result")).to_contain_text(f"{name}.safetensors")
    expect(page.locator("#lohatrain_live .lohatrain-numbers")).to_contain_text(f"step {steps}/{steps}")
    expect(page.locator("#lohatrain_live svg.lohatrain-chart")).to_be_visible()
    expect(page.locator("#lohatrain_live img.lohatrain-preview")).to_be_visible()
    expect(page.locator("#lohatrain_send")).to_be_enabled()


def screenshot(page, name: str, locator: str | None = None) -> None:
    """A picture for the README when LOHATRAIN_SCREENSHOTS names a folder (`make screenshots`): a panel, or the page
    as a user sees it (the window, at the top)."""
    folder = os.environ.get("LOHATRAIN_SCREENSHOTS")
    if folder and locator is None:
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(Path(folder) / name))
    elif folder:
        page.locator(locator).screenshot(path=str(Path(folder) / name))


def check_a_clean_folder_and_apply_the_suggestion(page, folder: Path) -> None:
    """Check dataset at 256 px: count, buckets and thumbnails, each image once under "Too small" (the sample images
    are 64 to 160 px), and the suggested steps and rate, which Apply puts into the form and which follow the batch
    size and the type."""
    fill(page, "lohatrain_dataset", folder)
    fill(page, "lohatrain_resolution", 256)
    open_accordion(page, "Developer options")
    fill(page, "lohatrain_bucket_min", 64)
    page.locator("#lohatrain_check").click()
    report = page.locator("#lohatrain_report").first  # Gradio 3 gives its inner box the same id
    expect(report).to_contain_text("8 images, 8 with a caption")
    expect(report.locator("table tr")).to_have_count(1 + 3)  # header + 3 buckets at 256 px
    expect(page.locator("#lohatrain_thumbs img")).to_have_count(8)
    small = report.locator("li.lohatrain-problem[data-kind=small]")
    expect(small.locator("li[data-file]")).to_have_count(8)
    for i in range(8):  # each image named once in the whole report: the upscaling is said once, by the doctor
        assert report.inner_text().count(f"sample_0{i}.png") == 1

    suggestion = page.locator("#lohatrain_suggestion").first
    expect(suggestion).to_contain_text("Suggested: 400 steps at learning rate 0.001")
    expect(suggestion).to_contain_text("8 images at batch size 4")
    fill(page, "lohatrain_steps", 5)
    fill(page, "lohatrain_lr", 0.5)
    page.locator("#lohatrain_apply").click()
    expect(page.locator("#lohatrain_steps input")).to_have_value("400")
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.001")
    fill(page, "lohatrain_batch_size", 1)
    page.locator("#lohatrain_batch_size input[type=number]").press("Enter")
    expect(suggestion).to_contain_text("Suggested: 800 steps")
    pick_method(page, "LoRA")
    expect(suggestion).to_contain_text("at learning rate 0.0001")
    fill(page, "lohatrain_lr", 0.5)
    page.locator("#lohatrain_apply").click()
    expect(page.locator("#lohatrain_steps input")).to_have_value("800")
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.0001")


def check_the_doctor_lists_each_file_once(page, folder: Path) -> None:
    """Problems grouped by kind, what to do said once per group, each file once in each group it belongs to (and
    nowhere else: not in the scan's message, which would say the missing caption again)."""
    from lohatrain import doctor
    from lohatrain.demo import make_sample_dataset

    make_sample_dataset(folder)
    (folder / "sample_02.txt").write_text("")
    (folder / "sample_05.txt").unlink()
    fill(page, "lohatrain_dataset", folder)
    fill(page, "lohatrain_resolution", 256)
    open_accordion(page, "Developer options")
    fill(page, "lohatrain_bucket_min", 64)
    page.locator("#lohatrain_check").click()
    groups = page.locator("#lohatrain_report li.lohatrain-problem")
    expect(groups).to_have_count(3)
    expected = {"small": [f"sample_0{i}.png" for i in range(8)], "missing_caption": ["sample_05.png"],
                "empty_caption": ["sample_02.png"]}
    for kind, files in expected.items():
        group = page.locator(f"#lohatrain_report li.lohatrain-problem[data-kind={kind}]")
        expect(group).to_contain_text(doctor.KINDS[kind].advice)
        expect(group.locator("li[data-file]")).to_have_count(len(files))
        assert [li.get_attribute("data-file") for li in group.locator("li[data-file]").all()] == files
    expect(page.locator("#lohatrain_report li.lohatrain-problem[data-kind=missing_caption]")).to_contain_text(
        "Training cannot start until this is fixed")
    text = page.locator("#lohatrain_report").first.inner_text()
    for i in range(8):
        assert text.count(f"sample_0{i}.png") == sum(f"sample_0{i}.png" in files for files in expected.values())
    assert "needs fixing" not in text  # the scan's own list of the same files


def check_only_the_fields_that_apply_are_shown(page) -> None:
    """Per type (methods.TYPES: DoRA where it applies, the LoKr factor for LoKr, the conv sizes where a type adapts
    convolutions), per caption mode (the phrase, the caption extension), per optimizer (its own options; Prodigy's
    learning rates 1.0, saying why) and per loss (Huber's options); the Advanced panels folded until opened."""
    for title, first_field in ADVANCED_PANELS.items():
        expect(page.locator(f"#{first_field}")).to_be_hidden()
        open_accordion(page, title)
        expect(page.locator(f"#{first_field}")).to_be_visible()
    check_the_optimizers_fields(page)
    for loss, huber in (("huber", True), ("l2", False), ("smooth_l1", True)):
        pick(page, "lohatrain_loss_type", loss)
        for elem_id in ("lohatrain_huber_schedule", "lohatrain_huber_c", "lohatrain_huber_scale"):
            field = expect(page.locator(f"#{elem_id}"))
            field.to_be_visible() if huber else field.to_be_hidden()
    open_accordion(page, "Network size")
    shown = {"lohatrain_dora": ["LoRA", "LoCon (LoRA + convolutions)", "LoHa"], "lohatrain_lokr_factor": ["LoKr"],
             "lohatrain_conv_dim": ["LoCon (LoRA + convolutions)", "LoHa", "LoKr"]}
    for label in ["LoKr", "LoRA", "LoCon (LoRA + convolutions)", "LoHa"]:
        pick_method(page, label)
        for elem_id, labels in shown.items():
            field = expect(page.locator(f"#{elem_id}"))
            field.to_be_visible() if label in labels else field.to_be_hidden()
    modes = {"No caption": [], "Single phrase": ["lohatrain_phrase"], "TXT captions": ["lohatrain_ext"]}
    for mode, fields in modes.items():
        page.locator("#lohatrain_caption_mode label", has_text=mode).click()
        for elem_id in ("lohatrain_phrase", "lohatrain_ext"):
            field = expect(page.locator(f"#{elem_id}"))
            field.to_be_visible() if elem_id in fields else field.to_be_hidden()


def check_the_optimizers_fields(page) -> None:
    """Each optimizer's own options shown only while it is chosen; Prodigy sets the learning rate to 1.0 and says
    why, AdamW sets it back."""
    options = {"lohatrain_prodigy_d_coef": "Prodigy", "lohatrain_prodigy_bias_correction": "Prodigy",
               "lohatrain_prodigy_safeguard_warmup": "Prodigy", "lohatrain_adafactor_relative_step": "Adafactor"}
    for optimizer in ("Prodigy", "Adafactor", "AdamW"):
        pick(page, "lohatrain_optimizer", optimizer)
        for elem_id, owner in options.items():
            field = expect(page.locator(f"#{elem_id}"))
            field.to_be_visible() if owner == optimizer else field.to_be_hidden()
        expect(page.locator("#lohatrain_weight_decay")).to_be_visible()  # every optimizer's
        expect(page.locator("#lohatrain_optimizer_args")).to_be_visible()
        if optimizer == "Prodigy":
            expect(page.locator("#lohatrain_lr input")).to_have_value("1")
            expect(page.locator("#lohatrain_optimizer_note").first).to_contain_text(
                "Learning rate set to 1, which is Prodigy's: it finds the step size itself")
    expect(page.locator("#lohatrain_lr input")).to_have_value("0.001")  # LoHa's with AdamW


KOHYA_TOML = """\
[network_arguments]
network_module = "networks.lora"
network_dim = 8
network_alpha = 4
[optimizer_arguments]
optimizer_type = "Prodigy"
learning_rate = 1.0
optimizer_args = ["d_coef=2.0"]
[training_arguments]
output_name = "from-kohya"
max_train_steps = 300
caption_dropout_rate = 0.1
loss_type = "huber"
huber_c = 0.2
gradient_accumulation_steps = 2
"""


def check_loading_a_kohya_toml(page, dataset: Path, tmp_path: Path) -> None:
    """An sd-scripts TOML put into Load settings fills every field it sets, the Advanced panels' too, keeps the
    dataset folder (it names none) and lists what was not taken in the message."""
    config = tmp_path / "config.toml"
    config.write_text(KOHYA_TOML)
    fill(page, "lohatrain_dataset", dataset)
    open_accordion(page, "Load settings from a kohya config")
    page.locator("#lohatrain_kohya_config input[type=file]").set_input_files(str(config))
    message = page.locator("#lohatrain_message").first
    expect(message).to_contain_text("Imported an sd-scripts config")
    expect(message).to_contain_text("Not taken:")
    expect(message).to_contain_text("gradient_accumulation_steps = 2")
    expect(page.locator("#lohatrain_name textarea")).to_have_value("from-kohya")
    expect(page.locator("#lohatrain_steps input")).to_have_value("300")
    expect(page.locator("#lohatrain_method input")).to_have_value("LoRA")
    expect(page.locator("#lohatrain_dataset textarea")).to_have_value(str(dataset))  # kept
    expect(page.locator("#lohatrain_optimizer input")).to_have_value("Prodigy")
    expect(page.locator("#lohatrain_lr input")).to_have_value("1")
    for title in ADVANCED_PANELS:
        open_accordion(page, title)
    expect(page.locator("#lohatrain_prodigy_d_coef input")).to_have_value("2")
    expect(page.locator("#lohatrain_caption_dropout_rate input")).to_have_value("0.1")
    expect(page.locator("#lohatrain_loss_type input")).to_have_value("huber")
    expect(page.locator("#lohatrain_huber_c input")).to_have_value("0.2")
