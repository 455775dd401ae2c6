"""Shared fixtures: the tiny SD1 model and the procedural sample dataset."""

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
