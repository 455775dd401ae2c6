"""Folders of the stand-in WebUI: a temporary root (or $LOHATRAIN_STUB_ROOT), laid out as the host's."""
import os
import tempfile
from pathlib import Path


def normalized_filepath(filepath):
    return str(Path(filepath).absolute())


script_path = os.path.abspath(os.environ.get("LOHATRAIN_STUB_ROOT") or tempfile.mkdtemp(prefix="lohatrain-webui-"))
modules_path = os.path.join(script_path, "modules")
cwd = os.getcwd()
data_path = script_path  # the host's --data-dir defaults to the WebUI folder
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file
default_output_dir = os.path.join(data_path, "outputs")

for _folder in (models_path, extensions_dir):
    os.makedirs(_folder, exist_ok=True)
