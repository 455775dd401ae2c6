"""LoCon: LoRA's maths and file keys (lora.py) on the 3x3 convolutions too, a conv's down a conv of the layer's
own kernel. Its files cannot be told from a LoRA's by their keys; the metadata names it (`algo` locon)."""
from __future__ import annotations

from .base import NetworkType, Preset, by_family
from .lora import LORA, LoRA

# LoRA's ranks, with half that rank on the 3x3 convs; LoRA's rate.
LOCON = NetworkType(
    name="locon", label="LoCon (LoRA + convolutions)",
    summary="LoRA on the convolutions too: styles and textures, in files about twice a LoRA's",
    adapter=LoRA, suffixes=LORA.suffixes, file_kind=LORA.file_kind,
    dora=True, convolutions=True, learning_rate=LORA.learning_rate,
    presets=by_family({
        "small": Preset("Small: fast, faces and simple objects", 8, 4, 4, 2, 12.5),
        "medium": Preset("Medium: characters", 16, 8, 8, 4, 24.9),
        "high": Preset("High: characters with details, styles", 32, 16, 16, 8, 49.8),
        "highest": Preset("Highest quality: styles and complex concepts", 64, 32, 32, 16, 99.7),
    }, {
        "small": Preset("Small: fast, faces and simple objects", 4, 2, 2, 1, 23.2),
        "medium": Preset("Medium: characters", 8, 4, 4, 2, 46.3),
        "high": Preset("High: characters with details, styles", 16, 8, 8, 4, 92.7),
        "highest": Preset("Highest quality: styles and complex concepts", 32, 16, 16, 8, 185.4),
    }))
