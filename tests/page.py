"""The page served on a stand-in host (tests/webui_app.py) as tests drive it: over HTTP (a run's body, waiting for
a state, the routes behind Gradio's login) and in the browser (filling the tab, a run interrupted from it)."""
from __future__ import annotations

import re
import time

import httpx
from playwright.sync_api import expect

import webui_app
from modules import shared


def run_body(ui, name: str, **overrides) -> dict:
    body = {"name": name, "dataset_dir": str(ui.root / "dataset"), "caption_mode": "txt", "resolution": 64,
            "bucket_min_side": 64, "bucket_max_side": 128, "steps": 4, "batch_size": 2, "train_dtype": "fp32",
            "save_dtype": "fp16", "gradient_checkpointing": False, "seed": 3, "network_preset": "small",
            "overwrite": True}
    return {**body, **overrides}


def wait_until(ui, predicate, timeout: float = 180, **request) -> dict:
    """Poll the status route until `predicate(status)` holds (a bounded wait for a state, not a timing)."""
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(f"{ui.url}/lohatrain/v1/status", **request).json()
        if predicate(status):
            return status
        assert time.monotonic() < deadline, f"gave up waiting; last status: {status}"
        time.sleep(0.05)


def finished(status) -> bool:
    return status["state"] in ("done", "error", "interrupted")


def rest_behind_gradio_auth(ui, monkeypatch) -> None:
    """On a WebUI reachable from the network with --gradio-auth and no --api-auth, the REST routes answer the
    page's own logged-in browser (Gradio's login cookie, named per app in Gradio 4) and refuse anyone else."""
    monkeypatch.setattr(shared.cmd_opts, "listen", True)
    monkeypatch.setattr(shared.cmd_opts, "gradio_auth", "user:secret")
    monkeypatch.setattr(ui.demo.server_app, "auth", {"user": "secret"})
    assert httpx.get(f"{ui.url}/lohatrain/v1/status").status_code == 403
    with httpx.Client(base_url=ui.url) as browser:
        assert browser.post("/login", data={"username": "user", "password": "wrong"}).status_code == 400
        assert browser.get("/lohatrain/v1/status").status_code == 403
        assert browser.post("/login", data={"username": "user", "password": "secret"}).status_code == 200
        assert browser.get("/lohatrain/v1/status").status_code == 200


TIMEOUT = 180_000  # ms; a bound on waiting for a state in the browser, never a timing


def fill(page, elem_id: str, value) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input[type=number]").first.fill(str(value))


def open_accordion(page, title: str) -> None:
    page.get_by_text(title, exact=True).click()


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
