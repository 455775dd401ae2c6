"""The host lohatrain runs in, chosen once at start-up by what the WebUI's folder holds: Forge 2 has `modules_forge`
and its own `backend`, reForge `main` has `modules_forge` on Forge's first backend (`ldm_patched`), AUTOMATIC1111
neither. Each host is one file here (hosts/base.py says what it implements); this module imports only the one in use.
"""
from __future__ import annotations

import importlib.util

from .base import Host

_current: Host | None = None


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package that does not exist
        return False


def kind() -> str:
    """"forge", "reforge" or "a1111", by the packages the WebUI's folder holds."""
    if _has("modules_forge") and _has("backend.diffusion_engine"):
        return "forge"
    if _has("modules_forge") and _has("ldm_patched"):
        return "reforge"
    return "a1111"


def current() -> Host:
    """The host of this process (made at the first call)."""
    global _current
    if _current is None:
        which = kind()
        if which == "forge":
            from .forge import ForgeHost as chosen
        elif which == "reforge":
            from .reforge import ReForgeHost as chosen
        else:
            from .a1111 import A1111Host as chosen
        _current = chosen()
    return _current
