"""WebUI entry point: registers the "LoRA training" tab, its settings and its REST routes.

When lohatrain cannot run in this WebUI (a torch older than it supports, a dependency missing or failing at
import in any way), the WebUI still starts: the log and the tab say in one line what is wrong and what to do.
"""
from modules import script_callbacks

TITLE = "LoRA training"


def _unavailable(reason: str) -> None:
    print(f"[lohatrain] the {TITLE} tab is unavailable: {reason}", flush=True)

    def tab():
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as block:
            gr.Markdown(f"**{TITLE} is unavailable in this WebUI:** {reason}", elem_id="lohatrain_unavailable")
        return [(block, TITLE, "lohatrain")]

    script_callbacks.on_ui_tabs(tab)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    what = f"{type(error).__name__}: {text[-1] if text else ''}"
    return (f"{what}. Restart the WebUI so that the extension's installer can add or replace what it needs; "
            "if the message stays, the console above it says which package failed")


try:
    from lohatrain.compat import torch_too_old

    problem = torch_too_old()
    if problem is None:
        import lohatrain.hosts
        import lohatrain.webui as lohatrain_webui
        import lohatrain.webui.actions  # noqa: F401  (fails here, not in the tab, if a dependency is broken)

        lohatrain.hosts.current()  # the host's adapter, chosen once: its imports fail here too
except Exception as e:  # an AttributeError from a package built for a newer torch as much as an ImportError
    problem = _reason(e)

if problem is not None:
    _unavailable(problem)
else:
    script_callbacks.on_ui_tabs(lohatrain_webui.on_ui_tabs)
    script_callbacks.on_ui_settings(lohatrain_webui.on_ui_settings)
    script_callbacks.on_app_started(lohatrain_webui.on_app_started)
