#!/usr/bin/env bash
# Creates .venv-stock: the environment a stock WebUI v1.10.1 install creates (its modules/launch_utils.py and
# requirements_versions.txt): Python 3.10, torch 2.1.2 + torchvision 0.16.2 (CUDA 12.1 builds, which run on
# the CPU; about 3 GB with their nvidia-* libraries, kept in pip's cache between runs), then the WebUI's pins.
# lycoris-lora comes through the extension's own install.py, as in the WebUI. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python310=$(ls "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10.*/bin/python3.10 2>/dev/null | tail -n 1)
[ -n "$python310" ] || { python3.10 -V >/dev/null 2>&1 && python310=$(command -v python3.10); }
[ -n "$python310" ] || { echo "Python 3.10 is needed for the stock-WebUI environment (pyenv install 3.10)"; exit 1; }
"$python310" -m venv .venv-stock
pip=".venv-stock/bin/python -m pip --disable-pip-version-check -q"
# The WebUI installs torch first, on its own (launch_utils.prepare_environment), then its requirements.
$pip install torch==2.1.2 torchvision==0.16.2
$pip install -c tools/constraints-stock.txt -r tools/requirements-stock.txt
$pip install --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==2.20.0
.venv-stock/bin/python install.py
