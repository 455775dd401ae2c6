#!/usr/bin/env bash
# Creates .venv with everything the demo and the tests need (CPU only). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=".venv/bin/python -m pip --disable-pip-version-check -q"
$pip install -c tools/constraints.txt torch==2.13.0
$pip install -c tools/constraints.txt -r tools/requirements-dev.txt
# ldm (the WebUI's copy of Stability-AI's code) and open-clip-torch (only for its CLIP BPE vocabulary file):
# their declared dependencies would replace the pins above, so they come without them.
$pip install --no-deps stable-diffusion-sdkit==2.1.5 open-clip-torch==3.3.0
# lycoris-lora as the WebUI gets it: the extension's own installer picks the version for this torch.
.venv/bin/python install.py
