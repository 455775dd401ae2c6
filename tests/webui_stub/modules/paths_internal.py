"""Folders of the stand-in WebUI: a temporary root (or $LOHATRAIN_STUB_ROOT), laid out as the host's.

Ports modules/paths_internal.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import os
import tempfile
from pathlib import Path


def normalized_filepath(filepath):
    return str(Path(filepath).absolute())


script_path = os.path.abspath(os.environ.get("LOHATRAIN_STUB_ROOT") or tempfile.mkdtemp(prefix="lohatrain-webui-"))
cwd = os.getcwd()
data_path = script_path  # the host's --data-dir defaults to the WebUI folder
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file

for _folder in (models_path, extensions_dir):
    os.makedirs(_folder, exist_ok=True)
