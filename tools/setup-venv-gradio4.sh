#!/usr/bin/env bash
# Creates .venv-gradio4: .venv's engine and ldm stack (Python 3.11, torch 2.13 CPU) under Forge 2's web stack
# (Gradio 4.40), for the tab's tests on a Forge host. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gradio4
pip=".venv-gradio4/bin/python -m pip --disable-pip-version-check -q"
$pip install -c tools/constraints.txt torch==2.13.0
$pip install -c tools/constraints.txt -r tools/requirements-gradio4.txt
# As in setup-venv.sh: ldm and open-clip-torch without their declared dependencies, which would move the pins.
$pip install --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==3.3.0
# lycoris-lora as the WebUI gets it: the extension's own installer picks the version for this torch.
.venv-gradio4/bin/python install.py
