"""Shared fixtures: the tiny model of each family, the procedural sample dataset, the page and the browser, a
Train click, and a fresh host on each stand-in (A1111's `webui`, Forge's `forge_host`). Helpers that are not fixtures
are plain modules beside this file: runs.py (the engine's), a1111.py, forge_env.py, page.py."""

import copy
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lohatrain.demo import build_tiny_sd1, make_sample_dataset  # noqa: E402


@pytest.fixture(scope="session")
def _tiny_model_template():
    return build_tiny_sd1(0)


@pytest.fixture
def tiny_model(_tiny_model_template):
    """A fresh `build_tiny_sd1(0)` per test (a deep copy: tests may train or patch it)."""
    return copy.deepcopy(_tiny_model_template)


@pytest.fixture(scope="session")
def _sd2_template():
    from lohatrain.demo import build_tiny_sd2

    return build_tiny_sd2(0)


@pytest.fixture
def sd2_model(_sd2_template):
    """A fresh `build_tiny_sd2(0)` (768-v layout, v-prediction) per test."""
    return copy.deepcopy(_sd2_template)


@pytest.fixture(scope="session")
def _sdxl_template():
    from lohatrain.demo_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(0)


@pytest.fixture
def sdxl_model(_sdxl_template):
    """A fresh `build_tiny_sdxl(0)` per test."""
    return copy.deepcopy(_sdxl_template)


@pytest.fixture
def family_model(request):
    """The tiny model of the family a test is parametrised with (`family`: "sd1", "sd2" or "sdxl"), fresh."""
    family = request.getfixturevalue("family")
    return request.getfixturevalue({"sd1": "tiny_model", "sd2": "sd2_model", "sdxl": "sdxl_model"}[family])


@pytest.fixture
def fixed_clock(monkeypatch):
    """The timestamps a run writes (kohya's ss_training_started_at and the like) fixed through SOURCE_DATE_EPOCH,
    so two runs' files can be compared byte for byte."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")


@pytest.fixture
def sample_dataset(tmp_path):
    """The built-in demo dataset (8 PNGs with .txt captions) in a temporary folder."""
    return make_sample_dataset(tmp_path / "dataset")


@pytest.fixture(scope="session")
def webui_server(tmp_path_factory):
    """The WebUI page with the extension, on the host stand-in, served on localhost for the whole session."""
    import webui_app

    ui = webui_app.start(tmp_path_factory.mktemp("webui"))
    make_sample_dataset(ui.root / "dataset")
    yield ui
    ui.close()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, driven by Playwright (the registry's own browser download is not used)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _live_tensor_bytes() -> int:
    """The memory every tensor alive in this process holds, each storage counted once."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.fixture
def live_tensor_bytes():
    """A function that measures what all live tensors hold (each storage once): a run holding a second copy of
    the model's weights shows as that much more memory."""
    return _live_tensor_bytes


@pytest.fixture
def run_job():
    """What a Train click does in the WebUI, on the host the test set up (lohatrain.hosts.current()): the click's
    preflight, then the job itself. Returns the result and the job (its losses, preview and messages)."""
    from lohatrain.jobs import Job
    from lohatrain.webui import actions

    def run(settings, via: str = "tab", **job_fields):
        job = Job(settings.name, actions.preflight(settings, via=via), **job_fields)
        return actions.run_training(job), job

    return run


@pytest.fixture
def webui(tmp_path):
    """A fresh A1111 host (the stand-in, tests/webui_stub): empty checkpoint and Lora folders, no model loaded,
    default options; the session page's model and folders are put back afterwards. a1111.py loads and generates."""
    import a1111  # noqa: F401  (puts the stand-in on sys.path)
    import networks
    from modules import sd_models, shared

    o = shared.cmd_opts
    saved = (o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat, sd_models.model_factory)
    saved_model = (sd_models.model_data, shared.opts.data.get("sd_model_checkpoint"))
    o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat = (str(tmp_path / d) for d in ("ckpt", "Lora", "LyCORIS"))
    for d in ("ckpt", "Lora"):
        (tmp_path / d).mkdir()
    sd_models.model_data = sd_models.SdModelData()
    shared.opts.data["sd_model_checkpoint"] = None
    networks.loaded_networks.clear()
    networks.networks_in_memory.clear()
    networks.list_available_networks()
    sd_models.list_models()
    yield tmp_path
    o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat, sd_models.model_factory = saved
    sd_models.model_data, shared.opts.data["sd_model_checkpoint"] = saved_model
    sd_models.list_models()
    networks.loaded_networks.clear()
    shared.state.interrupted = shared.state.skipped = False


@pytest.fixture
def forge_memory():
    """Forge's memory manager (the stand-in's) with nothing loaded and unbounded memory, before and after."""
    from forge_env import memory_management

    memory_management.current_loaded_models.clear()
    memory_management.total_vram = float("inf")
    yield memory_management
    memory_management.current_loaded_models.clear()
    memory_management.total_vram = float("inf")


@pytest.fixture
def forge_host(tmp_path, monkeypatch, forge_memory):
    """lohatrain's host adapter in Forge mode, on the WebUI stand-in's `modules` (Forge keeps that API) with an empty
    Lora folder, Forge's `sd_models.forge_model_reload` (the loaded model is the chosen one: it returns it), Forge's
    txt2img (tests/forge_stub/forge_processing.py) and its Lora extension. The test sets `shared.sd_model`."""
    from forge_env import ForgeHost, install_forge_txt2img
    from modules import sd_models, shared

    from lohatrain import hosts

    host = ForgeHost()
    monkeypatch.setattr(hosts, "_current", host)
    monkeypatch.setattr(sd_models, "model_data", sd_models.SdModelData())
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(tmp_path / "Lora"))
    (tmp_path / "Lora").mkdir()
    install_forge_txt2img(monkeypatch)
    yield host, shared, monkeypatch
