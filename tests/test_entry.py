"""The extension's entry script as the WebUI loads it, when lohatrain cannot run: the WebUI still starts, and
the log and the tab say in one line what is wrong and what to do.

Each case runs the script in a fresh Python (the host stand-in's `modules` on the path) so that a broken
package can stand first on sys.path without touching this test process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUB = Path(__file__).resolve().parent / "webui_stub"

LOAD_THE_SCRIPT = """
import json, runpy, sys
PRELUDE
from modules import script_callbacks
runpy.run_path("scripts/lohatrain_tab.py")
registered = {k: len(v) for k, v in script_callbacks.callback_map.items() if v}
tabs = script_callbacks.ui_tabs_callback()
texts = [b.value for tab in tabs for b in tab[0].blocks.values() if type(b).__name__ == "Markdown"]
script_callbacks.ui_settings_callback()
from modules import shared
sections = sorted({i.section[1] for k, i in shared.opts.data_labels.items() if k.startswith("lohatrain_")})
print(json.dumps({"registered": registered, "titles": [t[1] for t in tabs], "texts": texts, "sections": sections}))
"""

# What lycoris-lora 4.x does at import on torch 2.1.2 (lycoris/kernels/library.py).
BROKEN_LYCORIS = "raise AttributeError(\"module 'torch.library' has no attribute 'custom_op'\")\n"


def load_entry_script(tmp_path: Path, prelude: str = "") -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO), str(STUB)])}
    code = LOAD_THE_SCRIPT.replace("PRELUDE", prelude)
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


@pytest.fixture
def broken_lycoris(tmp_path):
    package = tmp_path / "site" / "lycoris"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(BROKEN_LYCORIS)
    return tmp_path


def test_a_dependency_failing_at_import_gives_a_tab_that_says_so(broken_lycoris):
    result, log = load_entry_script(broken_lycoris)
    ours = [line for line in log.splitlines() if line.startswith("[lohatrain]")]
    assert len(ours) == 1 and "AttributeError: module 'torch.library' has no attribute 'custom_op'" in ours[0]
    assert "Restart the WebUI" in ours[0]
    assert result["registered"] == {"callbacks_ui_tabs": 1}  # no settings, no routes: nothing that would fail
    assert result["titles"] == ["LoRA training"]
    assert len(result["texts"]) == 1 and "custom_op" in result["texts"][0]
    assert "unavailable" in result["texts"][0]


def test_a_torch_older_than_supported_is_named_with_what_to_do(tmp_path):
    result, log = load_entry_script(tmp_path, prelude="import torch; torch.__version__ = '2.0.1+cu118'")
    assert "torch 2.0.1+cu118" in log and "update the WebUI" in log
    assert result["titles"] == ["LoRA training"]
    assert "lohatrain needs torch 2.1 or later" in result["texts"][0]


def test_a_working_environment_registers_the_tab_settings_and_routes(tmp_path):
    result, log = load_entry_script(tmp_path)
    assert "[lohatrain]" not in log
    assert result["registered"] == {"callbacks_ui_tabs": 1, "callbacks_ui_settings": 1,
                                    "callbacks_app_started": 1}
    assert result["titles"] == ["LoRA training"] == result["sections"]  # the WebUI's own term, what users look for
