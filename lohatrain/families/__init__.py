"""What differs between model families (SD1, SD2, SDXL): one small module each, chosen by `detect`."""
from __future__ import annotations

from ..errors import LohatrainError
from .sd1 import SD1
from .sd2 import SD2

# Most specific first: SD2 also has everything SD1.matches looks for.
FAMILIES = (SD2, SD1)


def describe(model) -> str:
    """What the loaded model is, in the host's words where it says (its is_* flags, model_type)."""
    kind = type(model).__name__
    model_type = getattr(model, "model_type", None)
    if model_type is not None:
        name = getattr(model_type, "name", None) or str(model_type)
        return f"{name} ({kind})"
    for flag, name in (("is_sdxl", "SDXL"), ("is_sd3", "SD3"), ("is_ssd", "SSD-1B"), ("is_sd2", "SD 2.x"),
                       ("is_sd1", "SD 1.x")):
        if getattr(model, flag, False):
            return f"{name} ({kind})"
    return kind


def detect(model):
    """The family object for a loaded model, or a clear error naming what cannot be trained."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise LohatrainError(
        f"lohatrain cannot train on the loaded model, {describe(model)}: only Stable Diffusion 1.x and 2.x "
        "checkpoints are supported so far. Load an SD1.5- or SD2.x-based checkpoint and try again.")
