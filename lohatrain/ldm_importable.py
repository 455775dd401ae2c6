"""Makes ldm (the WebUI's `ldm` package, installed as a dependency outside it) importable on the command line, and
quiet there.

ldm imports `torchvision.utils.make_grid` at module top, for image logging that training never calls. Inside
the WebUI torchvision is installed; outside it (the command line, the tests) no torchvision wheel may load beside
the installed torch. There, and only there, a stand-in module whose `make_grid` raises is put in its place:
an importable torchvision is never replaced. Import this module before anything that imports ldm.

Importing these libraries prints three lines that are not lohatrain's and read like errors to a newcomer, so they
are imported here, once, with exactly those lines left out (`LOHATRAIN_VERBOSE=1`, the command line's --verbose,
shows them): pkg_resources' deprecation warning, which lightning_fabric's namespace declaration triggers when
pytorch_lightning is imported; Lightning's deprecation of the `rank_zero_only` that ldm's ddpm.py decorates with;
and ldm's "No module 'xformers'. Proceeding without it." (printed by ldm.modules.diffusionmodules.model; lohatrain
runs ldm's attention through torch's SDPA, lohatrain.sdpa).
"""
import contextlib
import importlib
import importlib.machinery
import io
import os
import sys
import types
import warnings

# (category, message regex) of each known warning, and the known printed line
_KNOWN_WARNINGS = ((UserWarning, r"pkg_resources is deprecated as an API"),
                   (DeprecationWarning, r"`pytorch_lightning\.utilities\.distributed\.rank_zero_only` has been "
                                        r"deprecated"))
_KNOWN_LINES = ("No module 'xformers'. Proceeding without it.",)


@contextlib.contextmanager
def _known_noise_left_out():
    """Inside: the known warnings ignored and the known printed lines dropped (every other line printed)."""
    if os.environ.get("LOHATRAIN_VERBOSE"):
        yield
        return
    printed = io.StringIO()
    with warnings.catch_warnings():
        for category, message in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        try:
            with contextlib.redirect_stdout(printed):
                yield
        finally:
            kept = [line for line in printed.getvalue().splitlines(keepends=True) if line.strip() not in _KNOWN_LINES]
            sys.stdout.write("".join(kept))


# Imported before the stand-in so that their "is torchvision installed?" checks (run at import) see the truth.
with _known_noise_left_out():
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

with _known_noise_left_out():
    importlib.import_module("ldm.models.diffusion.ddpm")  # imports ldm.modules.diffusionmodules.model too
