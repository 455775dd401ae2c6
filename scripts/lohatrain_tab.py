"""WebUI entry point: registers the LoHa training tab, its settings and its REST routes."""
from modules import script_callbacks

try:
    import lohatrain.webui as lohatrain_webui
    import lohatrain.webui.host  # noqa: F401  (fails here, not in the tab, if lycoris-lora is missing)
except ImportError as e:  # e.g. lycoris-lora could not be installed: say so once, keep the WebUI running
    print(f"[lohatrain] the LoHa training tab is unavailable: {e}")
else:
    script_callbacks.on_ui_tabs(lohatrain_webui.on_ui_tabs)
    script_callbacks.on_ui_settings(lohatrain_webui.on_ui_settings)
    script_callbacks.on_app_started(lohatrain_webui.on_app_started)
