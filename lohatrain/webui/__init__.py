"""The WebUI side of lohatrain. Only `host.py` imports the WebUI's own modules."""
from __future__ import annotations

from ..jobs import JobRunner

_runner: JobRunner | None = None


def runner() -> JobRunner:
    """The one JobRunner of this WebUI process, shared by the tab and the REST routes."""
    global _runner
    if _runner is None:
        from .host import run_training
        _runner = JobRunner(run_training)
    return _runner


def on_ui_tabs():
    from .ui import build_tab
    return [(build_tab(runner()), "LoRA training", "lohatrain")]


def on_app_started(_demo, app) -> None:
    from .api import register
    register(app, runner())


def on_ui_settings() -> None:
    from .host import register_settings
    register_settings()
