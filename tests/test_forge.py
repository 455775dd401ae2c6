"""Training Forge 2's own loaded model in place, through lohatrain's Forge adapter, on the Forge stand-in
(tests/forge_stub, written from Forge's source): per family it trains, leaves the model exactly as found (the same
weight objects, values, inference-tensor status, devices, loaded models and LoRA patches), and the file applied with
Forge's ComfyUI-derived loader reproduces the trained model's output."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forge_env import (USERS_LORA_LAYERS, a_users_lora, forge_state, lora_patcher, probe, settings_for, train_on,
                       unet_of, unet_output)
from backend import memory_management  # noqa: E402  (forge_env put the Forge stand-in on sys.path)
from backend.loader import forge_loader  # noqa: E402

from lohatrain.errors import LohatrainError
from lohatrain.hosts.forge import ForgeHost

pytestmark = pytest.mark.usefixtures("forge_memory")


@pytest.mark.parametrize("kind,method,extra", [
    ("sd1", "loha", dict(conv_dim=2, conv_alpha=1)),
    ("sd2", "lora", dict(dora=True)),
    ("sdxl", "lokr", dict(gradient_checkpointing=True)),
])
def test_training_leaves_forges_model_as_found_and_the_file_reproduces_it(kind, method, extra, sample_dataset,
                                                                        tmp_path):
    engine = forge_loader(kind)
    # What the run must get past, as in Forge: every weight an inference tensor, and `Linear` not an nn.Linear.
    assert all(p.is_inference() for p in unet_of(engine).parameters())
    linears = [m for m in unet_of(engine).modules() if type(m).__name__ == "Linear"]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in linears)
    # The last generation used a LoRA: Forge merged it into the weights when it loaded that patcher.
    users = lora_patcher(engine, a_users_lora(engine), "users.safetensors")
    engine.forge_objects.unet = users
    inputs = probe(engine, kind)
    with torch.inference_mode():
        memory_management.load_models_gpu([users])
    # Room for the UNet alone: loading the VAE or a text encoder unloads it, as on a small GPU.
    memory_management.total_vram = memory_management.module_size(engine.forge_objects.unet.model) + 1
    before = forge_state(engine)
    seen = {}

    def on_step(step, network):
        # What a preview does: the host encodes a prompt, which unloads the UNet (under inference mode), and
        # samples `forge_objects.unet`, which must be the unpatched one (the network alone shows).
        engine.get_learned_conditioning(["a preview"])
        assert engine.forge_objects.unet is engine.forge_objects_original.unet
        if step == 4:
            seen["trained"] = unet_output(engine, kind, inputs)

    settings = settings_for(sample_dataset, tmp_path, training_method=method, **extra)
    result = train_on(engine, settings, on_step=on_step)
    assert result.status == "done" and result.steps_done == 4

    after = forge_state(engine)
    # Loading the user's patcher again merged its LoRA again, into new Parameters (as every Forge refresh does).
    merged_again = {("unet", f"diffusion_model.{path}.weight") for path in USERS_LORA_LAYERS}
    assert {k for k in after["objects"] if after["objects"][k] != before["objects"][k]} <= merged_again
    assert {**after, "objects": None} == {**before, "objects": None}
    memory_management.total_vram = float("inf")
    with torch.inference_mode():
        memory_management.load_models_gpu([engine.forge_objects_original.unet])
    pure_output = unet_output(engine, kind, inputs)
    trained = lora_patcher(engine, load_file(result.file), "forge.safetensors")
    with torch.inference_mode():
        memory_management.load_models_gpu([trained])
    file_output = unet_output(engine, kind, inputs)
    assert not torch.allclose(pure_output, seen["trained"], atol=1e-4)  # the network changed something
    torch.testing.assert_close(file_output, seen["trained"], atol=2e-5, rtol=1e-4)


def test_a_run_holds_no_second_copy_of_forges_weights(sample_dataset, tmp_path, live_tensor_bytes):
    """Forge makes every weight under inference mode; the run trains on those very weights (issue: the run held a
    second UNet in CPU memory, +3.4 GB for SD 1.5 in the real Forge)."""
    engine = forge_loader("sd1")
    with torch.inference_mode():
        memory_management.load_models_gpu([engine.forge_objects.unet])
    unet_bytes = memory_management.module_size(engine.forge_objects.unet.model)
    before, during = live_tensor_bytes(), []

    def on_step(step, network):
        engine.get_learned_conditioning(["a preview"])  # the host moves the model meanwhile, as for a preview
        during.append(live_tensor_bytes() - before)

    train_on(engine, settings_for(sample_dataset, tmp_path), on_step=on_step)
    # What the run adds is the network, its optimizer state and the cached latents: far less than the UNet.
    assert max(during) < unet_bytes / 2, (max(during), unet_bytes)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_the_memory_estimate_leaves_forges_model_as_found_and_is_what_its_step_holds(kind, sample_dataset, tmp_path,
                                                                                     monkeypatch):
    """Forge's weights are inference tensors its memory manager moves: the estimate stands fakes in for them
    without loading or moving anything, and the step it tracks is the step a run on them takes."""
    from lohatrain import loop, memory

    engine = forge_loader(kind)
    settings = settings_for(sample_dataset, tmp_path, steps=2, gradient_checkpointing=True, shuffle_tags=True)
    before = forge_state(engine)
    est = memory.estimate(ForgeHost().parts_of(engine), settings)
    assert forge_state(engine) == before
    tracker, seen, real_step = memory.Tracker(), {}, loop.step

    def tracked_step(setup, state):
        if state.step == 1:
            tracker.reset_peak()
            seen["start"] = tracker.live["cpu"]
        with tracker:
            real_step(setup, state)
        seen["step"] = tracker.peak["cpu"] - seen.get("start", 0)

    monkeypatch.setattr(loop, "step", tracked_step)
    train_on(engine, settings)
    assert est.parts["activations"] == pytest.approx(seen["step"], rel=0.1)


def test_a_unet_forge_cannot_fit_whole_is_refused_and_left_as_found(sample_dataset, tmp_path):
    engine = forge_loader("sd1")
    with torch.inference_mode():
        memory_management.load_models_gpu([engine.forge_objects.unet])
    memory_management.total_vram = memory_management.module_size(engine.forge_objects.unet.model) - 1
    before = forge_state(engine)
    with pytest.raises(LohatrainError, match="could not fit the whole UNet"):
        train_on(engine, settings_for(sample_dataset, tmp_path))
    after = forge_state(engine)
    assert {**after, "unet_loaded": None} == {**before, "unet_loaded": None}


def test_the_text_encoder_is_not_trained_on_forge_and_the_refusal_says_why(sample_dataset, tmp_path):
    engine = forge_loader("sd1")
    with pytest.raises(LohatrainError, match="inference_mode"):
        train_on(engine, settings_for(sample_dataset, tmp_path, text_encoder_lr=1e-4))


def test_the_hosts_job_trains_forges_loaded_model_with_its_clip_skip_and_leaves_it_as_found(forge_host,
                                                                                            sample_dataset, run_job):
    from types import SimpleNamespace

    from safetensors import safe_open

    from lohatrain.webui import actions

    host, shared, _ = forge_host
    engine = forge_loader("sd1")
    engine.sd_checkpoint_info = SimpleNamespace(filename="/models/tiny-forge.safetensors", sha256="f0f0", name="tiny")
    shared.sd_model = engine
    engine.get_learned_conditioning(["a generation"])  # as after a generation: the text encoder loaded
    with torch.inference_mode():
        memory_management.load_models_gpu([engine.forge_objects.unet])
    before = forge_state(engine)

    encode = host.parts_of(engine).prompt_encoder(2)
    skipped, plain = encode(["blue circle"]), host.parts_of(engine).prompt_encoder(1)(["blue circle"])
    assert not skipped.is_inference() and not torch.allclose(skipped, plain)
    engine.set_clip_skip(2)
    torch.testing.assert_close(skipped, engine.get_learned_conditioning(["blue circle"]))
    engine.set_clip_skip(1)

    settings = settings_for(sample_dataset, Path("unused"), name="forge_job", steps=2, clip_skip=2)
    result, job = run_job(settings)
    assert result.status == "done" and len(job.losses) == 2
    assert result.file.parent == Path(shared.cmd_opts.lora_dir)
    with safe_open(str(result.file), "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2" and f.metadata()["ss_sd_model_name"] == "tiny-forge.safetensors"
    assert engine.text_processing_engine.clip_skip == 1  # the engine's own setting back
    assert forge_state(engine) == before
    with pytest.raises(LohatrainError, match="inference_mode"):
        actions.preflight(dataclasses.replace(settings, text_encoder_lr=1e-4), via="tab")


def test_before_forge_loads_the_checkpoint_the_tab_says_so_and_the_job_loads_it(forge_host, sample_dataset):
    from lohatrain.jobs import Job
    from lohatrain.webui import actions

    host, shared, monkeypatch = forge_host
    engine = forge_loader("sd1")
    shared.sd_model = object()  # Forge's FakeInitialModel, until the first generation
    assert "not loaded yet" in host.model_summary()["problem"]
    settings = settings_for(sample_dataset, Path("unused"), name="lazy", steps=1)
    prepared = actions.preflight(settings, via="tab")  # the model's checks wait for the job, which loads it
    from modules import sd_models
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: (engine, True))
    assert actions.run_training(Job("lazy", prepared)).status == "done"


# Each WebUI folder in turn first on sys.path, as the WebUI's own folder is, in one fresh Python.
TELL_APART = """
import importlib, sys
from lohatrain.hosts import kind
found = []
for root in sys.argv[1:]:
    sys.path.insert(0, root)
    importlib.invalidate_caches()
    found.append(kind())
    sys.path.remove(root)
    for name in [n for n in sys.modules if n.split(".")[0] in ("modules_forge", "backend", "ldm_patched")]:
        del sys.modules[name]
print(" ".join(found))
"""


def test_the_host_is_told_apart_at_start_up(tmp_path):
    """Forge 2 has modules_forge and its own backend, reForge's main modules_forge on Forge's first backend
    (ldm_patched), A1111 neither: each gets its own host."""
    import subprocess

    layouts = {"forge": ("modules_forge", "backend", "backend/diffusion_engine"),
               "reforge": ("modules_forge", "ldm_patched"), "a1111": ()}
    for kind, packages in layouts.items():
        (tmp_path / kind).mkdir()
        for package in packages:
            (tmp_path / kind / package).mkdir(parents=True)
            (tmp_path / kind / package / "__init__.py").touch()
    env = {"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin"}
    found = subprocess.run([sys.executable, "-c", TELL_APART, *(str(tmp_path / k) for k in layouts)], env=env,
                           capture_output=True, text=True, check=True).stdout.split()
    assert found == list(layouts)


def test_the_tab_says_what_forge_cannot_do(forge_host):
    from lohatrain.webui import ui

    host, shared, _ = forge_host
    shared.sd_model = forge_loader("sd1")
    assert "text encoder is not trained" in ui._model_markdown()


def test_a_unet_forge_holds_quantised_is_refused(sample_dataset, tmp_path):
    engine = forge_loader("sd1")
    engine.forge_objects.unet.model.storage_dtype = "nf4"  # Forge's "Diffusion in Low Bits" NF4
    with pytest.raises(LohatrainError, match="Diffusion in Low Bits"):
        train_on(engine, settings_for(sample_dataset, tmp_path))
