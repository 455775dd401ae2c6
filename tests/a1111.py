"""The A1111 WebUI stand-in (tests/webui_stub) as tests drive it: load a tiny checkpoint of a family through the
host's own loading, and generate through its txt2img. Importing this module puts the stand-in on sys.path; the
`webui` fixture (conftest.py) gives each test a fresh host."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

import lohatrain.demo  # noqa: F401  (before anything that imports ldm)

STUB = str(Path(__file__).resolve().parent / "webui_stub")
if STUB not in sys.path:
    sys.path.insert(0, STUB)

from modules import processing, sd_models, shared  # noqa: E402

STEPS = 4  # sampling steps of a generation here


def write_checkpoint(folder: Path, name: str, seed: int) -> Path:
    path = folder / "ckpt" / f"{name}.safetensors"
    save_file(lohatrain.demo.build_tiny_sd1(seed).state_dict(), str(path))
    return path


def placeholder_checkpoint(folder: Path, name: str) -> Path:
    """A checkpoint file that holds no state dict: the stand-in's factory builds the model by its name ("xl": the
    tiny SDXL, "sd2"/"v2": the tiny SD2 768-v, else SD1, seeded from the name) and its weights stay."""
    path = folder / "ckpt" / f"{name}.ckpt"
    path.write_bytes(b"placeholder, not a state dict")
    return path


def loaded(folder: Path, name: str = "base", seed: int = 0):
    """A tiny SD1 checkpoint written to the host's folder and loaded as the host loads one."""
    write_checkpoint(folder, name, seed)
    sd_models.list_models()
    sd_models.reload_model_weights()
    return shared.sd_model


def loaded_placeholder(folder: Path, name: str):
    placeholder_checkpoint(folder, name)
    sd_models.list_models()
    sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match(name))
    return shared.sd_model


def loaded_sd2(folder: Path, name: str = "tiny-SD2"):
    return loaded_placeholder(folder, name)


def loaded_sdxl(folder: Path, name: str = "tiny-XL"):
    return loaded_placeholder(folder, name)


def loaded_family(folder: Path, family: str):
    return {"sd1": loaded, "sd2": loaded_sd2, "sdxl": loaded_sdxl}[family](folder)


def generate(prompt: str, seed: int = 7, **kw):
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, steps=STEPS, width=64, height=64,
                                                    do_not_save_grid=True, do_not_save_samples=True, **kw)
    return processing.process_images(p)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)
