"""The network types a user can train, one small module each, as the WebUI's Lora extension has
network_lora.py, network_hada.py and network_lokr.py: each type holds its parameters, knows its file keys and
computes its ΔW with lycoris-lora's `lycoris.functional` maths. The wiring (network.py), the loop and the
file writer are the same for every type; DoRA is a switch on top of LoRA, LoCon and LoHa (network.py).
"""
from __future__ import annotations

from .base import Adapter
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA

# training_method -> the type's parameters and ΔW. LoCon is LoRA's maths on the 3x3 convs too.
METHODS: dict[str, type[Adapter]] = {"lora": LoRA, "locon": LoRA, "loha": LoHa, "lokr": LoKr}
LABELS = {"lora": "LoRA", "locon": "LoCon (LoRA + convolutions)", "loha": "LoHa", "lokr": "LoKr"}
ADAPTS_3X3 = {"lora": False, "locon": True, "loha": True, "lokr": True}
DORA_METHODS = ("lora", "locon", "loha")  # LyCORIS' and the WebUI's DoRA cover these; LoKr is left out here

__all__ = ["ADAPTS_3X3", "Adapter", "DORA_METHODS", "LABELS", "LoHa", "LoKr", "LoRA", "METHODS"]
