"""The network types a user can train, one small module each, as the WebUI's Lora extension has
network_lora.py, network_hada.py and network_lokr.py and ComfyUI comfy/weight_adapter/<type>.py: each module
declares one `NetworkType` (label, file keys, DoRA and convolution support, learning rate, presets, metadata,
settings rules) and an `Adapter` that holds the parameters and computes ΔW with lycoris-lora's
`lycoris.functional` maths. The settings, the wiring (network.py), the file writer, the tab and the REST API
read `TYPES`; a new type is one new module and one line here. DoRA is a switch on top (network.py).
"""
from __future__ import annotations

from ..quiet import known_noise_left_out

with known_noise_left_out():
    import lycoris  # noqa: F401  (imports bitsandbytes, whose known log line lohatrain.quiet leaves out)

from .base import Adapter, NetworkType, Preset
from .locon import LOCON
from .loha import LOHA
from .lokr import LOKR
from .lora import LORA

TYPES: dict[str, NetworkType] = {t.name: t for t in (LORA, LOCON, LOHA, LOKR)}  # in the tab's order

__all__ = ["Adapter", "NetworkType", "Preset", "TYPES"]
