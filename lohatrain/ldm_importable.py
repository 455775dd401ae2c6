"""Makes ldm (the WebUI's `ldm` package, installed as a dependency outside it) importable on the command line, and
quiet there.

ldm imports `torchvision.utils.make_grid` at module top, for image logging that training never calls. Inside
the WebUI torchvision is installed; outside it (the command line, the tests) no torchvision wheel may load beside
the installed torch. There, and only there, a stand-in module whose `make_grid` raises is put in its place:
an importable torchvision is never replaced. Import this module before anything that imports ldm.

Importing these libraries prints lines that are not lohatrain's: they are imported here, once, with the known
ones left out (lohatrain.quiet).
"""
import importlib
import importlib.machinery
import sys
import types

from .quiet import known_noise_left_out

# Imported before the stand-in so that their "is torchvision installed?" checks (run at import) see the truth.
with known_noise_left_out():
    import pytorch_lightning  # noqa: F401
    import transformers  # noqa: F401

try:
    import torchvision  # noqa: F401
except ImportError:
    _tv = types.ModuleType("torchvision")
    _tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    _tv_utils = types.ModuleType("torchvision.utils")
    _tv_utils.__spec__ = importlib.machinery.ModuleSpec("torchvision.utils", None)

    def _make_grid(*args, **kwargs):
        raise NotImplementedError("torchvision is not installed (lohatrain.ldm_importable stand-in)")

    _tv_utils.make_grid = _make_grid
    _tv.utils = _tv_utils
    sys.modules["torchvision"] = _tv
    sys.modules["torchvision.utils"] = _tv_utils

with known_noise_left_out():
    importlib.import_module("ldm.models.diffusion.ddpm")  # imports ldm.modules.diffusionmodules.model too
