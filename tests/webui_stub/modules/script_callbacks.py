"""Extension callbacks (the few lohatrain uses). As the host: registration appends a `ScriptCallback`; the
callers run every callback in order and a callback that raises is reported to stderr and skipped, never
propagated. (The host also orders callbacks by user settings and extension metadata; not done here.)

Ports modules/script_callbacks.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from __future__ import annotations

import dataclasses
import inspect
import os

from modules import errors


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: any
    name: str = "unnamed"


callback_map = dict(
    callbacks_app_started=[],
    callbacks_model_loaded=[],
    callbacks_ui_tabs=[],
    callbacks_ui_settings=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
)


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else 'unknown file'
    base = f"base/{os.path.basename(filename)}/{category}" + (f"/{name}" if name is not None else "")
    unique, index = base, 0
    while any(x.name == unique for x in callbacks):
        index += 1
        unique = f"{base}-{index}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def ordered_callbacks(category):
    return list(callback_map['callbacks_' + category])


def app_started_callback(demo, app):
    for c in ordered_callbacks('app_started'):
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, 'app_started_callback')


def model_loaded_callback(sd_model):
    for c in ordered_callbacks('model_loaded'):
        try:
            c.callback(sd_model)
        except Exception:
            report_exception(c, 'model_loaded_callback')


def ui_tabs_callback():
    res = []
    for c in ordered_callbacks('ui_tabs'):
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, 'ui_tabs_callback')
    return res


def ui_settings_callback():
    for c in ordered_callbacks('ui_settings'):
        try:
            c.callback()
        except Exception:
            report_exception(c, 'ui_settings_callback')


def on_app_started(callback, *, name=None):
    """callback(demo: gr.Blocks | None, app: FastAPI)"""
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


def on_model_loaded(callback, *, name=None):
    """callback(sd_model): after a checkpoint is loaded into a new or the same model object."""
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


def on_ui_tabs(callback, *, name=None):
    """callback() -> None or [(gradio component, title, elem_id), ...]"""
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


def on_ui_settings(callback, *, name=None):
    """callback(): add settings with shared.opts.add_option(key, shared.OptionInfo(...))"""
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')
