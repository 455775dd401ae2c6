"""What production code imports: the engine, the command line's checkpoint loading and the WebUI side never import
the demo's tiny models (lohatrain.demo*), and what makes ldm importable outside the WebUI never replaces a
torchvision that imports. Each case runs in a fresh Python, where nothing the tests imported is loaded yet."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = [REPO / "tests" / "webui_stub", REPO / "tests" / "forge_stub", REPO / "tests" / "reforge_stub"]

IMPORT_EVERY_MODULE = """
import importlib, json, pkgutil, sys
import lohatrain.ldm_importable  # as a host provides torchvision: before the Forge stand-in imports ldm
import lohatrain
names = [m.name for m in pkgutil.walk_packages(lohatrain.__path__, "lohatrain.")
         if not m.name.startswith("lohatrain.demo")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "demo": sorted(n for n in sys.modules if n.startswith("lohatrain.demo"))}))
"""

IMPORT_LDM = """
import json
import lohatrain.ldm_importable
import torch
import torchvision
from ldm.models.diffusion import ddpm
try:
    grid = type(ddpm.make_grid([torch.zeros(3, 2, 2)])).__name__
except NotImplementedError as e:
    grid = str(e)
print(json.dumps({"torchvision": getattr(torchvision, "__file__", None), "grid": grid}))
"""


def run_python(code: str, *path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*path, REPO]))}
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_no_production_module_imports_the_demo_models():
    """Every module of lohatrain but the demo's, the WebUI side and the hosts' adapters included."""
    result = run_python(IMPORT_EVERY_MODULE, *STUBS)
    assert {"lohatrain.checkpoint", "lohatrain.model_configs", "lohatrain.trainer", "lohatrain.__main__",
            "lohatrain.hosts.forge", "lohatrain.hosts.reforge", "lohatrain.webui.ui"} <= set(result["imported"])
    assert result["demo"] == []


def torchvision_installed() -> bool:
    try:
        importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not torchvision_installed(), reason="no torchvision here (the stock venv has the WebUI's)")
def test_an_installed_torchvision_is_what_ldm_gets():
    """As inside the WebUI: the stand-in never replaces a torchvision that imports."""
    result = run_python(IMPORT_LDM)
    assert "site-packages" in result["torchvision"] and result["grid"] == "Tensor"


@pytest.mark.skipif(torchvision_installed(), reason="torchvision is installed here")
def test_without_torchvision_ldm_imports_and_its_make_grid_says_why_it_cannot_run():
    result = run_python(IMPORT_LDM)
    assert result == {"torchvision": None, "grid": "torchvision is not installed (lohatrain.ldm_importable stand-in)"}


def demo_output(tmp_path: Path, *options: str) -> list[str]:
    """What `python -m lohatrain train --demo` prints (stdout and stderr), line by line, for a one-step run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOHATRAIN_VERBOSE", None)
    process = subprocess.run([sys.executable, "-m", "lohatrain", "train", "--demo", "--output-dir", str(tmp_path),
                              "--steps", "1", *options], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600)
    assert process.returncode == 0, process.stderr
    return (process.stdout + process.stderr).splitlines()


def test_the_demo_prints_only_lohatrains_own_lines_and_verbose_shows_the_libraries(tmp_path):
    """The libraries' import-time warnings (pkg_resources, Lightning) and ldm's xformers line are left out;
    --verbose shows them again."""
    lines = demo_output(tmp_path / "quiet")
    foreign = [line for line in lines if "Warning" in line or "site-packages" in line or "xformers" in line]
    assert foreign == [] and lines[0].startswith("wrote the demo's sample images") and lines[-1].startswith("wrote ")
    assert any(line.startswith("done: 1 steps") for line in lines)
    if importlib.util.find_spec("xformers") is None:  # ldm says so at import: the line --verbose brings back
        assert "No module 'xformers'. Proceeding without it." in demo_output(tmp_path / "verbose", "--verbose")
