"""The Forge 2 side of lohatrain (lllyasviel/stable-diffusion-webui-forge, and reForge's Forge 2 branch): what differs
from the A1111 adapter in lohatrain/webui, which keeps the tab, the routes and the job runner for both.
`model.py` talks to Forge's memory manager; `host.py` holds the host functions that differ."""
from __future__ import annotations

import importlib.util


def is_forge_host() -> bool:
    """Forge 2: its `modules_forge` package and its own `backend` with a diffusion engine. A1111 has neither;
    reForge's `main` has `modules_forge` on Forge's first backend (`ldm_patched`), which the A1111 adapter serves."""
    try:
        return (importlib.util.find_spec("modules_forge") is not None
                and importlib.util.find_spec("backend.diffusion_engine") is not None)
    except ModuleNotFoundError:
        return False
