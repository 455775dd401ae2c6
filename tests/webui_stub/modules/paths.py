"""Ports modules/paths.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a)."""
from modules.paths_internal import cwd, data_path, extensions_builtin_dir, extensions_dir, models_path, script_path  # noqa: F401
