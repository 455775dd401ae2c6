"""What differs between model families (SD1, SD2, SDXL): one small module each, chosen by `detect`."""
from __future__ import annotations

from ..errors import LohatrainError
from .sd1 import SD1

FAMILIES = (SD1,)


def detect(model):
    """The family object for a loaded model, or a clear error naming what cannot be trained."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    kind = type(model).__name__
    raise LohatrainError(
        f"lohatrain cannot train on the loaded model ({kind}): only Stable Diffusion 1.x checkpoints are "
        "supported so far. Load an SD1.5-based checkpoint and try again.")
