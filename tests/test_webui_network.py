"""lohatrain on a WebUI reachable from the network, and every bad request a caller can send, over real HTTP
against the page served on the host stand-in.

Which routes answer: with `--api-auth` the WebUI's own rule (HTTP Basic, modules/api/api.py at v1.10.1,
30c19445); listening on the network without it, none, unless an administrator allows it; the tab's own page
behind `--gradio-auth` by its login cookie. No answer holds a server path the caller did not send.
"""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

import webui_app  # noqa: F401  (puts the host stand-in on sys.path)
from modules import shared

import lohatrain.demo
from lohatrain.webui import ui

from page import finished, run_body, wait_until
from runs import model_state

ROUTES = [("POST", "train"), ("GET", "status"), ("POST", "interrupt"), ("GET", "presets"), ("GET", "preview")]


def call(server, method: str, route: str, **kwargs) -> httpx.Response:
    if route == "train":
        kwargs.setdefault("json", run_body(server, "net-test", steps=1))
    return httpx.request(method, f"{server.url}/lohatrain/v1/{route}", **kwargs)


def server_paths(server) -> list[str]:
    return [str(server.root), str(Path(shared.data_path)), str(server.lora_dir)]


@pytest.fixture
def flags(monkeypatch):
    def set_flags(**values):
        for name in ("listen", "share", "server_name", "gradio_auth", "api_auth"):
            monkeypatch.setattr(shared.cmd_opts, name, values.get(name, False if name in ("listen", "share") else None))
    return set_flags


@pytest.fixture
def logged_in(webui_server, monkeypatch):
    """The tab's page of a user who logged in through --gradio-auth: Gradio's own session cookie."""
    app = webui_server.demo.server_app
    monkeypatch.setattr(app, "auth", [("artist", "secret")])
    monkeypatch.setitem(app.tokens, "session-token", "artist")
    return {"access-token": "session-token"}


def test_listening_without_api_auth_answers_no_route_and_reveals_nothing(webui_server, flags):
    flags(listen=True)
    for method, route in ROUTES:
        r = call(webui_server, method, route)
        assert r.status_code == 403, route
        assert "--api-auth" in r.json()["detail"][0]
        assert not any(p in r.text for p in server_paths(webui_server))
    assert not (webui_server.lora_dir / "net-test.safetensors").exists()


def test_gradio_auth_alone_protects_the_tab_not_the_rest_api(webui_server, flags, logged_in):
    flags(listen=True, gradio_auth="artist:secret")
    assert call(webui_server, "GET", "status").status_code == 403  # an API client has no Gradio login
    assert call(webui_server, "GET", "status", cookies={"access-token": "stolen"}).status_code == 403
    r = call(webui_server, "GET", "status", cookies=logged_in)  # the logged-in tab's own page
    assert r.status_code == 200 and "state" in r.json()


def test_api_auth_is_required_and_checked_as_the_webui_checks_it(webui_server, flags):
    flags(listen=True, api_auth="bot:pw1,other:pw2")
    for method, route in ROUTES:
        r = call(webui_server, method, route)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", route
    assert call(webui_server, "GET", "status", auth=("bot", "wrong")).status_code == 401
    assert call(webui_server, "GET", "status", auth=("nobody", "pw1")).status_code == 401
    assert call(webui_server, "GET", "presets", auth=("other", "pw2")).status_code == 200
    r = call(webui_server, "POST", "train", auth=("bot", "pw1"), json=run_body(webui_server, "authorised", steps=1))
    assert r.status_code == 200
    status = wait_until(webui_server, finished, auth=("bot", "pw1"))
    assert status["state"] == "done" and status["file_name"] == "authorised.safetensors"
    assert "file" not in status and "preview" not in status
    assert not any(p in json.dumps(status) for p in server_paths(webui_server))


def test_api_auth_protects_the_routes_on_a_local_webui_too(webui_server, flags):
    flags(api_auth="bot:pw1")
    assert call(webui_server, "GET", "status").status_code == 401
    assert call(webui_server, "GET", "status", auth=("bot", "pw1")).status_code == 200


def test_a_local_webui_answers_every_route(webui_server, flags):
    flags()
    assert call(webui_server, "GET", "status").status_code == 200
    assert call(webui_server, "GET", "presets").status_code == 200
    assert call(webui_server, "POST", "interrupt").json() == {"interrupted": False}


def test_the_exposure_settings_cannot_be_changed_through_the_webuis_options_api(webui_server):
    for key in ("lohatrain_allow_any_path", "lohatrain_allow_unauthenticated_api"):
        assert shared.opts.data_labels[key].restrict_api


def test_the_tabs_panel_status_holds_no_server_path(webui_server, flags):
    flags()
    httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(
        webui_server, "panel", steps=2, preview_every_steps=1, preview_steps=2, preview_prompts=["blue circle"]))
    assert wait_until(webui_server, finished)["state"] == "done"
    text, sent, model_line, checkpoint, types, shown = ui.poll_status(lohatrain.webui.runner(), None, None, "panel")
    data = json.loads(text)
    assert data["file_name"] == "panel.safetensors" and data["preview_data"].startswith("data:image/png;base64,")
    assert data["file_exists"] and data["project_file"] == "panel"  # Send to txt2img can name it
    assert "tiny-sd1" in model_line and "SD 1.x" in model_line and "LoKr" in types
    assert not any(p in text + shown for p in server_paths(webui_server))
    again, _, *model_view, _ = ui.poll_status(lohatrain.webui.runner(), sent, shown, "no-such-file")
    assert "preview_data" not in json.loads(again)  # the page has this preview already
    assert json.loads(again)["project_file"] is None
    assert model_view == [ui.gr.update()] * 3  # the page has the model line as it is


@pytest.fixture
def exposed(webui_server, monkeypatch, tmp_path, flags):
    """--listen without a password, the REST API allowed by the administrator; the WebUI runs in its own
    folder; a home folder outside it with images, and a symlink inside it pointing there."""
    flags(listen=True)
    monkeypatch.setitem(shared.opts.data, "lohatrain_allow_unauthenticated_api", True)
    monkeypatch.chdir(shared.data_path)
    home = tmp_path / "home"
    lohatrain.demo.make_sample_dataset(home / "images")
    monkeypatch.setenv("HOME", str(home))
    link = Path(shared.data_path) / "linked-images"
    link.symlink_to(home / "images", target_is_directory=True)
    yield home
    link.unlink()


@pytest.mark.parametrize("folder", ["~/images", "linked-images", "../" * 8 + "{home}/images", "{home}/images"])
def test_exposed_webui_refuses_folders_outside_it_however_they_are_spelled(webui_server, exposed, folder):
    folder = folder.format(home=str(exposed).lstrip("/") if folder.startswith("../") else exposed)
    before = sorted(p.name for p in webui_server.lora_dir.iterdir())
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "outside",
                                                                           dataset_dir=folder))
    assert r.status_code == 422 and "without a password" in r.json()["detail"][0]
    assert not any(p in r.text for p in server_paths(webui_server))
    report, thumbnails, names, found = ui.check_dataset(folder, ui.CAPTION_LABELS["txt"], "", ".txt", 64, True, 64,
                                                        128)
    assert "without a password" in report and thumbnails == names == [] and found is None
    assert sorted(p.name for p in webui_server.lora_dir.iterdir()) == before


def test_exposed_webui_still_reads_folders_inside_it(webui_server, exposed):
    lohatrain.demo.make_sample_dataset(Path(shared.data_path) / "inside")
    report, thumbnails, names, found = ui.check_dataset("inside", ui.CAPTION_LABELS["txt"], "", ".txt", 64, True, 64,
                                                        128)
    assert "<b>8</b> images" in report and len(thumbnails) == len(names) == found.images == 8


def _bad_folders(root: Path) -> dict[str, str]:
    """Datasets a user gets wrong, each with what the answer must say."""
    lohatrain.demo.make_sample_dataset(root / "no-captions")
    for caption in (root / "no-captions").glob("*.txt"):
        caption.unlink()
    (root / "zero-bytes").mkdir()
    for i in range(3):
        (root / "zero-bytes" / f"{i}.png").write_bytes(b"")
        (root / "zero-bytes" / f"{i}.txt").write_text("a caption")
    (root / "empty").mkdir()
    (root / "a-file.png").write_bytes(b"not a folder")
    return {"no-captions": "caption file(s) are missing", "zero-bytes": "cannot be read",
            "empty": "No images found", "a-file.png": "is a file, not a folder", "missing": "does not exist"}


BAD_VALUES = [
    ({"network_preset": []}, "network_preset must be a text"),
    ({"network_preset": "huge"}, "network_preset must be one of"),
    ({"caption_ext": 5}, "caption_ext must be a text"),
    ({"caption_ext": "txt"}, "caption_ext must look like"),
    ({"caption_mode": "phrase", "caption_phrase": 5}, "caption_phrase must be a text"),
    ({"caption_mode": "phrase", "caption_phrase": "  "}, "caption_phrase: type the phrase"),
    ({"caption_mode": "auto"}, "caption_mode must be one of"),
    ({"dataset_dir": 5}, "dataset_dir must be a text"),
    ({"dataset_dir": ""}, "dataset_dir: choose the folder"),
    ({"steps": "10"}, "steps must be a whole number"),
    ({"steps": 1.5}, "steps must be a whole number"),
    ({"steps": True}, "steps must be a whole number"),
    ({"steps": 0}, "steps must be between"),
    ({"steps": -5}, "steps must be between"),
    ({"learning_rate": "1e-3"}, "learning_rate must be a number"),
    ({"learning_rate": 0}, "learning_rate must be above 0"),
    ({"learning_rate": 2}, "learning_rate must be above 0"),
    ({"resolution": None}, "resolution must be a whole number"),
    ({"resolution": 100}, "resolution must be a multiple of 64"),
    ({"resolution": 99968}, "resolution must be between"),
    ({"bucketing": "yes"}, "bucketing must be true or false"),
    ({"overwrite": 1}, "overwrite must be true or false"),
    ({"batch_size": 0}, "batch_size must be between"),
    ({"dim": 0}, "dim must be between"),
    ({"dim": 2000}, "dim must be between"),
    ({"alpha": 0}, "alpha must be above 0"),
    ({"conv_dim": -1}, "conv_dim must be between"),
    ({"train_dtype": "fp8"}, "train_dtype must be one of"),
    ({"save_dtype": "int8"}, "save_dtype must be one of"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
    ({"lr_warmup_steps": 4}, "lr_warmup_steps must be fewer than steps"),
    ({"noise_offset": 2}, "noise_offset must be at least 0"),
    ({"min_snr_gamma": -1}, "min_snr_gamma must be at least 0"),
    ({"keep_tokens": -1}, "keep_tokens must be between"),
    ({"seed": -2}, "seed must be between"),
    ({"seed": 1.0}, "seed must be a whole number"),
    ({"clip_skip": 13}, "clip_skip must be between"),
    ({"clip_skip": "2"}, "clip_skip must be a whole number or null"),
    ({"preview_prompts": "a cat"}, "preview_prompts must be a list of texts"),
    ({"preview_prompts": ["a", 1]}, "preview_prompts must be a list of texts"),
    ({"learnin_rate": 1}, "unknown setting 'learnin_rate'"),
    ({"name": 7}, "name must be a text"),
    ({"name": None}, "name must be a text"),
    ({"name": ""}, "name: give the LoRA a name"),
    ({"name": "../escape"}, "must be a plain file name"),
    ({"name": "a/b"}, "must be a plain file name"),
    ({"name": "bad:name"}, "must be a plain file name"),
    ({"name": ".hidden"}, "must be a plain file name"),
    ({"name": " lead"}, "must not start or end with spaces"),
    ({"name": "con"}, "reserved by Windows"),
    ({"name": "x" * 101}, "name is too long"),
    ({"zero_terminal_snr": True}, "zero_terminal_snr needs a v-prediction model"),
    ({"name": "exists", "overwrite": False}, "already exists in the output folder"),
]


def test_every_bad_request_is_answered_422_with_its_message_and_nothing_changes(webui_server, tmp_path):
    server = webui_server
    (server.lora_dir / "exists.safetensors").write_bytes(b"an earlier file")
    folders = _bad_folders(tmp_path)
    cases = [(overrides, expected) for overrides, expected in BAD_VALUES]
    cases += [({"dataset_dir": str(tmp_path / name)}, expected) for name, expected in folders.items()]
    cases += [({"caption_mode": "txt", "dataset_dir": str(tmp_path / "no-captions"), "resolution": 64.0},
               "resolution must be a whole number")]
    assert len(cases) >= 40
    lora_before = sorted(p.name for p in server.lora_dir.rglob("*"))
    model_before = model_state(shared.sd_model)
    for overrides, expected in cases:
        body = {**run_body(server, "bad-input"), **overrides}
        r = httpx.post(f"{server.url}/lohatrain/v1/train", json=body)
        assert r.status_code == 422, (overrides, r.text)
        detail = r.json()["detail"]
        assert isinstance(detail, list) and all(isinstance(d, str) and d for d in detail), detail
        assert any(expected in d for d in detail), (overrides, detail)
        assert not any(p in r.text for p in server_paths(server) if p not in json.dumps(body)), (overrides, r.text)
    for raw, expected in ((b"[1, 2]", "JSON object"), (b"not json", "")):
        r = httpx.post(f"{server.url}/lohatrain/v1/train", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and expected in r.text
    assert httpx.get(f"{server.url}/lohatrain/v1/status").json().get("name") != "bad-input"  # no job started
    assert sorted(p.name for p in server.lora_dir.rglob("*")) == lora_before
    assert model_state(shared.sd_model) == model_before
    (server.lora_dir / "exists.safetensors").unlink()


def test_a_unicode_name_trains_into_a_file_of_that_name(webui_server):
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "ñame-テスト", steps=1))
    assert r.status_code == 200
    status = wait_until(webui_server, finished)
    assert status["state"] == "done" and status["file_name"] == "ñame-テスト.safetensors"
    assert (webui_server.lora_dir / "ñame-テスト.safetensors").is_file()
