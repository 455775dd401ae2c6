"""A running WebUI page with the lohatrain extension, on the host stand-in (tests/webui_stub).

Assembled the way the host v1.10.1 does it: the extension's `scripts/lohatrain_tab.py` registers its
callbacks, the settings callback runs, every `on_ui_tabs` tab is rendered into `gr.Tabs(elem_id="tabs")`
next to a txt2img tab, `javascript/*.js` and `style.css` are put into the page by replacing Gradio's
template response, and `on_app_started` gets the FastAPI app after launch. It runs under the host's Gradio 3.41 and under Forge 2's 4.40.

As a Forge 2 host (`start(..., forge=True)`): the Forge stand-in (tests/forge_stub) and Forge's `modules_forge`
(tests/forge_host_stub: its top bar's checkpoint list and choice) on sys.path, so lohatrain picks its Forge adapter;
Forge's checkpoint loading (tests/forge_stub/forge_sd_models.py) has loaded the chosen checkpoint, as after a first
generation: `shared.sd_model` is the stand-in's engine (Forge's `forge_loader`); txt2img (previews, the grid) is
Forge's and `networks` is Forge's Lora extension (tests/forge_env.py's install_forge_txt2img). Forge keeps the rest
of the `modules` API, so the WebUI stand-in serves it.

Run it by hand to look at the tab:  .venv/bin/python tests/webui_app.py [--forge]  (prints the URL)
"""
from __future__ import annotations

import runpy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "webui_stub"
FORGE_PATHS = [Path(__file__).resolve().parent / "forge_stub", Path(__file__).resolve().parent / "forge_host_stub"]
for path in (str(REPO), str(STUB), str(Path(__file__).resolve().parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import lohatrain.demo  # noqa: E402,F401  (before anything that imports ldm)
import gradio as gr  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import networks  # noqa: E402,F401  (A1111's Lora extension, loaded at start-up; a Forge page replaces it by Forge's)
from modules import script_callbacks, sd_models, shared  # noqa: E402


@dataclass
class WebUI:
    url: str
    root: Path
    demo: gr.Blocks

    @property
    def lora_dir(self) -> Path:
        return Path(shared.cmd_opts.lora_dir)

    def close(self) -> None:
        server = getattr(self.demo, "server", None)
        if server is not None:  # the session is over: uvicorn need not wait for a browser's open connections
            server.force_exit = True
        self.demo.close()


def _inject_assets() -> None:
    """The host's way of adding extension JavaScript and CSS to every page (modules/ui_gradio_extensions.py)."""
    js = "".join(f"<script>{p.read_text()}</script>" for p in sorted((REPO / "javascript").glob("*.js")))
    css = f"<style>{(REPO / 'style.css').read_text()}</style>"
    original = getattr(gr.routes.templates, "lohatrain_original", gr.routes.templates.TemplateResponse)
    gr.routes.templates.lohatrain_original = original

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f"{js}</head>".encode()).replace(b"</body>", f"{css}</body>".encode())
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response


CARD_REFRESHES: list[float] = []  # when the Lora cards were refreshed (what the tab's JavaScript triggers)


def _refresh_lora_cards() -> None:
    sys.modules["networks"].list_available_networks()  # the host's Lora extension: A1111's or Forge's
    CARD_REFRESHES.append(time.time())


def _start_forge() -> None:
    """Forge as after its start and a first generation: its checkpoint loading (tests/forge_stub/forge_sd_models.py)
    and top bar (modules_forge.main_entry) with the first listed checkpoint chosen, the stand-in's engine loaded by
    `forge_model_reload` and its UNet by the memory manager; Forge's txt2img and Lora extension, kept for the
    process."""
    for path in FORGE_PATHS:
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from lohatrain import hosts
    if hosts._current is not None and hosts._current.name != "Forge":
        raise RuntimeError("lohatrain's A1111 adapter is already chosen in this process: start the Forge host "
                           "in a process of its own")
    import pytest
    import torch
    import forge_sd_models
    from backend import memory_management
    from modules_forge import main_entry
    from forge_env import install_forge_txt2img

    monkeypatch = pytest.MonkeyPatch()  # never undone: the page's process is a Forge host
    install_forge_txt2img(monkeypatch)
    forge_sd_models.install(monkeypatch)
    shared.opts.set("sd_model_checkpoint", main_entry.refresh_models()[0][0])  # make_checkpoint_manager_ui
    main_entry.refresh_model_loading_parameters()  # forge_main_entry
    engine, _ = sd_models.forge_model_reload()
    with torch.inference_mode():
        memory_management.load_models_gpu([engine.forge_objects.unet])


def start(root: Path, port: int = 0, forge: bool = False) -> WebUI:
    """Checkpoint and Lora folders under `root`, a tiny SD1 checkpoint loaded, the page served on localhost;
    `forge`: as a Forge 2 host."""
    o = shared.cmd_opts
    o.ckpt_dir, o.lora_dir = str(root / "models" / "Stable-diffusion"), str(root / "models" / "Lora")
    Path(o.ckpt_dir).mkdir(parents=True, exist_ok=True)
    Path(o.lora_dir).mkdir(parents=True, exist_ok=True)
    checkpoint = Path(o.ckpt_dir) / "tiny-sd1.safetensors"
    if not checkpoint.exists():
        save_file(lohatrain.demo.build_tiny_sd1(0).state_dict(), str(checkpoint))
    sd_models.list_models()
    if forge:
        _start_forge()
    else:
        sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-sd1"))
    sys.modules["networks"].list_available_networks()

    script_callbacks.clear_callbacks()
    runpy.run_path(str(REPO / "scripts" / "lohatrain_tab.py"))
    script_callbacks.ui_settings_callback()
    _inject_assets()
    interfaces = script_callbacks.ui_tabs_callback()  # built outside the page's Blocks, as the host does
    with gr.Blocks(title="Stable Diffusion", analytics_enabled=False) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", lines=3, elem_id="txt2img_prompt")
                # the Lora cards' hidden refresh button (modules/ui_extra_networks.py, create_ui): rescans the folder
                gr.Button("Refresh", elem_id="txt2img_lora_extra_refresh_internal", visible=False).click(
                    fn=_refresh_lora_cards)
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    demo.queue(64)  # as webui.py calls it in both hosts (under Forge's Gradio 4 the 64 is the status update rate)
    app, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port or None,
                              quiet=True, show_api=False)
    script_callbacks.app_started_callback(demo, app)
    return WebUI(url.rstrip("/"), root, demo)


if __name__ == "__main__":
    import tempfile

    ui = start(Path(tempfile.mkdtemp(prefix="lohatrain-webui-")), port=7860, forge="--forge" in sys.argv)
    lohatrain.demo.make_sample_dataset(ui.root / "dataset")
    print(f"{ui.url}  (dataset: {ui.root / 'dataset'}; Ctrl-C to stop)", flush=True)
    while True:
        time.sleep(3600)
