"""Command-line options: the flags lohatrain and the stand-in read, with the host's defaults (cmd_args.py and
the Lora extension's preload.py). Parsed from an empty command line; tests change `cmd_opts` attributes.

Ports modules/shared_cmd_options.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import argparse
import os

from modules.paths_internal import data_path, models_path, normalized_filepath, script_path, sd_model_file

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", type=normalized_filepath, default=script_path)
parser.add_argument("--models-dir", type=normalized_filepath, default=None)
parser.add_argument("--ckpt", type=normalized_filepath, default=sd_model_file)
parser.add_argument("--ckpt-dir", type=normalized_filepath, default=None)
parser.add_argument("--no-half", action="store_true")
parser.add_argument("--no-half-vae", action="store_true")
parser.add_argument("--precision", type=str, choices=["full", "half", "autocast"], default="autocast")
parser.add_argument("--medvram", action="store_true")
parser.add_argument("--medvram-sdxl", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--share", action="store_true")
parser.add_argument("--ngrok", type=str, default=None)
parser.add_argument("--listen", action="store_true")
parser.add_argument("--server-name", type=str, default=None)
parser.add_argument("--gradio-auth", type=str, default=None)
parser.add_argument("--api-auth", type=str, default=None)
parser.add_argument("--api", action="store_true")
parser.add_argument("--enable-insecure-extension-access", action="store_true")
parser.add_argument("--hide-ui-dir-config", action="store_true", default=False)
parser.add_argument("--freeze-settings", action="store_true", default=False)
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--no-hashing", action="store_true", default=False)
parser.add_argument("--no-download-sd-model", action="store_true", default=False)
parser.add_argument("--embeddings-dir", type=normalized_filepath, default=os.path.join(script_path, "embeddings"))
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(data_path, "config.json"))
parser.add_argument("--lora-dir", type=normalized_filepath, default=os.path.join(models_path, "Lora"))
parser.add_argument("--lyco-dir-backcompat", type=normalized_filepath, default=os.path.join(models_path, "LyCORIS"))

cmd_opts = parser.parse_args([])
cmd_opts.webui_is_non_local = any([cmd_opts.share, cmd_opts.listen, cmd_opts.ngrok, cmd_opts.server_name])
cmd_opts.disable_extension_access = cmd_opts.webui_is_non_local and not cmd_opts.enable_insecure_extension_access
