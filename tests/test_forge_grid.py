"""Previews during a run and the steps × strength grid on Forge 2, through Forge's own txt2img: the stand-in's
(tests/forge_stub/forge_processing.py, its Lora extension in extensions-builtin/sd_forge_lora, its memory manager),
on the WebUI stand-in's `modules` with lohatrain's host adapter in Forge mode. Forge starts every generation from
its unpatched patchers and samples those its Lora extension made for the last `<lora:…>` prompt; these tests
check that previews show the network alone, that the grid's cells are Forge's own images of the saved files, and
that the model (weights, their inference status, devices, loaded patcher, merged LoRAs, Forge's LoRA state) is
exactly as found afterwards."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forge_env import USERS_LORA_LAYERS, a_users_lora, forge_state, settings_for
from backend import memory_management  # (forge_env put the Forge stand-in on sys.path)
from backend.loader import forge_loader

from lohatrain.errors import LohatrainError
from lohatrain.jobs import Job
from lohatrain.webui import actions


USERS_TEXT_LAYER = "transformer.text_model.encoder.layers.0.self_attn.q_proj"


def a_users_text_lora(engine) -> dict:
    """The text-encoder part of the user's LoRA: one CLIP layer (kohya's `lora_te_` keys)."""
    weight = engine.forge_objects.clip.cond_stage_model.get_submodule(USERS_TEXT_LAYER).weight
    gen = torch.Generator().manual_seed(4)
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    return {f"{key}.lora_up.weight": torch.randn(weight.shape[0], 2, generator=gen) * 0.5,
            f"{key}.lora_down.weight": torch.randn(2, weight.shape[1], generator=gen)}


MERGED_AGAIN = {("unet", f"diffusion_model.{path}.weight") for path in USERS_LORA_LAYERS} | {
    ("clip", f"{USERS_TEXT_LAYER}.weight")}


@pytest.fixture
def forge(forge_host):
    """Forge with a tiny SD1 checkpoint loaded, its txt2img and Lora extension, and a user's LoRA (users.safetensors,
    UNet and text encoder) used in the last generation: Forge merged it into their weights. Memory fits one part at
    a time, so each load unloads the others, as on a small GPU."""
    host, shared, _ = forge_host
    engine = forge_loader("sd1")
    engine.sd_checkpoint_info = SimpleNamespace(filename="/models/tiny-forge.safetensors", sha256="f0f0", name="tiny",
                                                name_for_extra="tiny", title="tiny-forge.safetensors")
    engine.sd_model_hash = "f0f0"
    shared.sd_model = engine
    lora_dir = Path(shared.cmd_opts.lora_dir)
    save_file({**a_users_lora(engine), **a_users_text_lora(engine)}, str(lora_dir / "users.safetensors"))
    networks = sys.modules["networks"]  # Forge's Lora extension (forge_host)
    txt2img("a photo <lora:users:40>", seed=1)  # strong, so that it shows in a 64 px image
    assert engine.forge_objects.unet.lora_patches and engine.forge_objects.clip.patcher.lora_patches
    memory_management.total_vram = memory_management.module_size(engine.forge_objects.unet.model) + 1
    yield SimpleNamespace(host=host, shared=shared, engine=engine, lora_dir=lora_dir, networks=networks)


def txt2img(prompt: str, seed: int, steps: int = 3, sampler: str = "DPM++ 2M") -> np.ndarray:
    """One image through the host's txt2img (Forge's, in these tests), as a user would make it."""
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, steps=steps, sampler_name=sampler,
                                                    width=64, height=64, do_not_save_grid=True,
                                                    do_not_save_samples=True)
    (image,) = processing.process_images(p).images
    return pixels(image)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def as_found(engine) -> dict:
    """forge_state plus Forge's LoRA state between generations: which patchers a generation starts from and samples,
    and the Lora extension's record of the last prompt's LoRAs. The user's LoRA is merged again when its patcher
    is loaded again, into new Parameters (as every Forge refresh does): the same values, not the same objects."""
    state = forge_state(engine)
    objects = {k: v for k, v in state["objects"].items() if k not in MERGED_AGAIN}
    return {**state, "objects": objects, "current_lora_hash": engine.current_lora_hash,
            "forge_objects": (engine.forge_objects, engine.forge_objects_after_applying_lora)}


def run(forge, sample_dataset, name: str, **overrides):
    settings = settings_for(sample_dataset, Path("unused"), name=name, learning_rate=2e-2, preview_steps=3,
                            preview_seed=11, preview_prompts=["blue circle"], **overrides)
    result = actions.run_training(Job(name, actions.preflight(settings, via="tab")))
    assert result.status == "done"
    return result


def test_previews_on_forge_show_the_network_alone_and_leave_the_model_as_found(forge, sample_dataset):
    before = as_found(forge.engine)
    run(forge, sample_dataset, "previewed", steps=4, preview_every_steps=2)
    assert as_found(forge.engine) == before

    folder = forge.lora_dir / "previewed.previews"
    step2, step4 = (pixels(Image.open(folder / f"step-00000{s}.png")) for s in (2, 4))
    memory_management.total_vram = float("inf")
    plain = txt2img("blue circle", seed=11)
    assert not np.array_equal(step2, step4) and not np.array_equal(step2, plain)
    # The last preview is the finished network alone: Forge applying the saved file gives the same picture (to a
    # rounding step: merged weights against the network beside them), not the one with the user's LoRA too.
    with_file = txt2img("blue circle <lora:previewed:1>", seed=11)
    assert np.abs(step4 - with_file).max() <= 1
    assert np.abs(step4 - txt2img("blue circle <lora:users:40> <lora:previewed:1>", seed=11)).max() > 8


def test_the_users_text_encoder_lora_is_off_while_a_run_encodes_its_captions(forge, sample_dataset):
    """The fixture's last generation applied the user's LoRA to the UNet and the text encoder: the run's captions
    encode as after a plain generation (the same step-1 loss), and the LoRA is back afterwards."""
    assert forge.engine.forge_objects_after_applying_lora.clip.patcher.lora_patches
    before = as_found(forge.engine)
    after_lora = run(forge, sample_dataset, "after-lora", steps=1).losses[0]
    assert as_found(forge.engine) == before
    txt2img("a photo", seed=1)
    assert after_lora == run(forge, sample_dataset, "after-plain", steps=1).losses[0]


@pytest.fixture
def trained(forge, sample_dataset):
    """A run saved at steps 2 and 4 in the Lora folder, trained through the host on Forge."""
    run(forge, sample_dataset, "grid-run", steps=4, save_every_steps=2)
    return forge


def test_the_grid_on_forge_is_forges_own_images_and_leaves_the_model_as_found(trained):
    before = as_found(trained.engine)
    made = actions.make_grid("grid-run", strengths=[0, 1], seed=5)
    assert as_found(trained.engine) == before
    assert [c.label for c in made.plan.columns] == ["No LoRA", "Step 2", "Step 4"]
    (cells,) = made.cells
    rows = [[pixels(cell) for cell in row] for row in cells]

    plain = txt2img("blue circle", seed=5)
    assert all(np.array_equal(row[0], plain) for row in rows)  # the no-LoRA column is Forge's plain txt2img
    assert all(np.array_equal(cell, plain) for cell in rows[0])  # strength 0 changes nothing
    assert not np.array_equal(rows[1][2], plain) and not np.array_equal(rows[1][1], rows[1][2])
    np.testing.assert_array_equal(rows[1][2], txt2img("blue circle <lora:grid-run:1>", seed=5))
    assert made.files == [trained.lora_dir / "grid-run.grid.png"] and made.files[0].is_file()


def test_a_file_rewritten_since_forge_read_it_is_read_again_by_the_grid(trained):
    """Forge keeps the files' tensors by name; a later run under the same name rewrites the file (here: its
    network zeroed, which changes nothing), and the grid must show the file as it is now."""
    path = trained.lora_dir / "grid-run.safetensors"
    txt2img("blue circle <lora:grid-run:1>", seed=5)  # Forge has read the file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({k: v * 0 for k, v in load_file(str(path)).items()}, str(path), metadata=metadata)
    made = actions.make_grid("grid-run", strengths=[1], seed=5)
    np.testing.assert_array_equal(pixels(made.cells[0][0][2]), pixels(made.cells[0][0][0]))


def test_interrupt_during_the_forge_grid_saves_nothing_and_leaves_the_model_as_found(trained, monkeypatch):
    """Here the UNet is not loaded when the grid starts (the VAE took its place, the user's LoRA still merged in
    its weights), then memory is plenty (the grid leaves it loaded): afterwards it is unloaded, with that LoRA
    merged."""
    with torch.inference_mode():
        memory_management.load_models_gpu([trained.engine.forge_objects.vae.patcher])
    memory_management.total_vram = float("inf")
    before = as_found(trained.engine)
    assert before["unet_loaded"] == [] and before["lora"][1]
    load_networks = trained.networks.load_networks

    def interrupted_at_step_4(names, *args, **kwargs):  # the user presses Interrupt while step 4's cell renders
        if names == ["grid-run"]:
            assert actions.interrupt_task()
        return load_networks(names, *args, **kwargs)

    monkeypatch.setattr(trained.networks, "load_networks", interrupted_at_step_4)
    with pytest.raises(LohatrainError, match="Interrupted: no grid was saved"):
        actions.make_grid("grid-run", strengths=[0.5, 1], seed=5)
    assert not list(trained.lora_dir.glob("*.png"))
    assert as_found(trained.engine) == before
    assert not trained.shared.state.interrupted
