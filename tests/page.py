"""The page served on a stand-in host (tests/webui_app.py) as tests drive it over HTTP: a run's body, waiting for a
state, the routes behind Gradio's login. In the browser: tests/tab.py."""
from __future__ import annotations

import time

import httpx

import webui_app  # noqa: F401  (puts the host stand-in on sys.path)
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
