"""Training Forge 2's own loaded model in place, through lohatrain's Forge adapter, on the Forge stand-in
(tests/forge_stub, written from Forge's source): per family it trains, leaves the model exactly as found (the same
weight objects, values, inference-tensor status, devices, loaded models and LoRA patches), and the file applied with
Forge's ComfyUI-derived loader reproduces the trained model's output."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lohatrain.ldm_importable  # noqa: F401  (before the stand-in imports ldm)

sys.path.insert(0, str(Path(__file__).parent / "forge_stub"))
sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))  # Forge keeps A1111's `modules`

from backend import memory_management  # noqa: E402
from backend.loader import forge_loader  # noqa: E402
from packages_3rdparty.comfyui_lora_collection.lora import load_lora, model_lora_keys_unet  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from lohatrain.errors import LohatrainError  # noqa: E402
from lohatrain.hosts.forge import ForgeHost  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402
from lohatrain.trainer import Hooks, train  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_memory_manager():
    memory_management.current_loaded_models.clear()
    memory_management.total_vram = float("inf")
    yield
    memory_management.current_loaded_models.clear()
    memory_management.total_vram = float("inf")


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    base = TrainSettings(name="forge", dataset_dir=str(dataset), output_dir=str(out), resolution=64,
                         bucket_min_side=64, bucket_max_side=128, steps=4, batch_size=2, learning_rate=3e-3,
                         train_dtype="fp32", save_dtype="fp32", gradient_checkpointing=False, seed=7,
                         ).with_preset("small")
    return dataclasses.replace(base, **overrides)


def train_on(engine, settings: TrainSettings, **hooks):
    """A run on Forge's engine as lohatrain's Forge host makes it: the engine's parts, in the host's session."""
    host = ForgeHost()
    parts = host.parts_of(engine)
    with host.session(parts) as load_unet:
        return train(parts, settings, Hooks(load_unet=load_unet, **hooks))


def unet_of(engine):
    return engine.forge_objects.unet.model.diffusion_model


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def forge_state(engine) -> dict:
    """What a run must leave as it found it, as comparable values: every tensor of the UNet, VAE and text
    encoders (value, inference status, requires_grad, device, dtype; for parameters also the object itself: torch
    replaces buffers on every move, Forge's own included), the UNet's forwards and modes, which UNet patcher is
    loaded and its LoRA state. Which of the other parts are loaded is the memory manager's choice."""
    parts = {"unet": engine.forge_objects.unet.model, "vae": engine.forge_objects.vae.first_stage_model,
             "clip": engine.forge_objects.clip.cond_stage_model}
    kmodel = engine.forge_objects.unet.model
    return {
        "tensors": {(part, name): (t.is_inference(), t.requires_grad, str(t.device), t.dtype, _digest(t))
                    for part, module in parts.items()
                    for name, t in [*module.named_parameters(), *module.named_buffers()]},
        "objects": {(part, name): id(t) for part, module in parts.items() for name, t in module.named_parameters()},
        "forwards": {name: "forward" in m.__dict__ for name, m in kmodel.named_modules()},
        "modes": {name: m.training for name, m in kmodel.named_modules()},
        "unet_loaded": [id(m.model) for m in memory_management.current_loaded_models if m.model.model is kmodel],
        "unet_location": getattr(kmodel, "stub_location", None) is memory_management.gpu,
        "lora": (kmodel.lora_loader.loaded_hash, sorted(kmodel.lora_loader.backup)),
        "patchers": (engine.forge_objects.unet, engine.forge_objects_original.unet),
    }


def lora_patcher(engine, tensors: dict, filename: str):
    """A clone of the unpatched UNet patcher with a file's patches, as Forge's Lora extension makes it; every key of
    the file must match under ComfyUI's rules."""
    patches, unmatched = load_lora(tensors, model_lora_keys_unet(engine.forge_objects_original.unet.model))
    assert unmatched == {}, sorted(unmatched)
    patcher = engine.forge_objects_original.unet.clone()
    assert patcher.add_patches(filename=filename, patches=patches) == set(patches)
    return patcher


USERS_LORA_LAYERS = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in")


def a_users_lora(engine) -> dict:
    """A small LoRA on two layers, as a user might have had active in the last generation."""
    gen = torch.Generator().manual_seed(3)
    unet = unet_of(engine)
    tensors = {}
    for path in USERS_LORA_LAYERS:
        weight = unet.get_submodule(path).weight
        out_dim, fan_in = weight.shape[0], weight[0].numel()
        key = "lora_unet_" + path.replace(".", "_")
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, 2, generator=gen) * 0.5
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, fan_in, generator=gen).reshape(2, *weight.shape[1:])
    return tensors


def probe(engine, kind: str):
    """A fixed input to compare UNet outputs: latents, timesteps and the engine's own conditioning."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = engine.get_learned_conditioning(["blue circle"])
    cond = {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()
    return x, torch.tensor([500.0]), cond


def unet_output(engine, kind, inputs):
    x, t, cond = inputs
    with torch.no_grad():
        if kind == "sdxl":
            return unet_of(engine)(x, t, context=cond["crossattn"], y=cond["vector"])
        return unet_of(engine)(x, t, context=cond)


def test_the_stand_in_computes_what_the_tiny_model_computes_and_keeps_forges_traps():
    from lohatrain.demo import build_tiny_sd1

    engine, tiny = forge_loader("sd1"), build_tiny_sd1(0)
    unet = unet_of(engine)
    linears = [m for m in unet.modules() if type(m).__name__ == "Linear"]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in linears)
    assert all(p.is_inference() for p in unet.parameters())
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([300])
    cond = engine.get_learned_conditioning(["red square"])
    with torch.no_grad():  # Forge's weights require grad: outside no_grad even a forward is refused
        torch.testing.assert_close(unet(x, t.float(), context=cond), tiny.model.diffusion_model(x, t, context=cond))
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        unet(x, t.float(), context=cond.clone()).sum().backward()
    for module in unet.modules():  # ordinary weights: the in-place adds of Forge's blocks still stop a backward
        for name, p in list(module._parameters.items()):
            module._parameters[name] = torch.nn.Parameter(p.detach().clone())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        unet(x, t.float(), context=cond.clone()).sum().backward()


@pytest.mark.parametrize("kind,method,extra", [
    ("sd1", "loha", dict(conv_dim=2, conv_alpha=1)),
    ("sd2", "lora", dict(dora=True)),
    ("sdxl", "lokr", dict(gradient_checkpointing=True)),
])
def test_training_leaves_forges_model_as_found_and_the_file_reproduces_it(kind, method, extra, sample_dataset,
                                                                        tmp_path):
    engine = forge_loader(kind)
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


@pytest.fixture
def forge_host(tmp_path, monkeypatch):
    """lohatrain's host adapter in Forge mode, on the WebUI stand-in's `modules` (Forge keeps that API) with the
    Forge stand-in's engine as `shared.sd_model`, Forge's `sd_models.forge_model_reload` (the loaded model is
    the chosen one: it returns it), Forge's txt2img (tests/forge_stub/forge_processing.py) and its Lora extension."""
    stub = str(Path(__file__).parent / "webui_stub")
    if stub not in sys.path:
        sys.path.insert(0, stub)
    from modules import sd_models, shared

    from lohatrain import hosts

    host = ForgeHost()
    monkeypatch.setattr(hosts, "_current", host)
    monkeypatch.setattr(sd_models, "model_data", sd_models.SdModelData())
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(tmp_path / "Lora"))
    (tmp_path / "Lora").mkdir()
    install_forge_txt2img(monkeypatch)
    yield host, shared, monkeypatch


def install_forge_txt2img(monkeypatch):
    """Forge's txt2img in the WebUI stand-in: its `process_images` (tests/forge_stub/forge_processing.py), its
    `sd_models.forge_model_reload` (the loaded model is the chosen one: it returns it) and its Lora extension.
    Shared with tests/webui_app.py's Forge page, which keeps them for the page's process and puts Forge's own
    checkpoint loading over them (tests/forge_stub/forge_sd_models.py)."""
    import forge_processing
    from modules import processing, sd_models, shared

    monkeypatch.setattr(processing, "process_images", forge_processing.process_images)
    monkeypatch.setattr(sd_models, "forge_model_reload", lambda: (shared.sd_model, False), raising=False)
    return forge_lora_extension(monkeypatch)


def forge_lora_extension(monkeypatch):
    """Forge's built-in Lora extension as Forge loads it: its folder's modules imported by their own names
    (`networks` replaces the A1111 one for this test), its ExtraNetworkLora the only registered extra network."""
    from modules import extra_networks

    folder = Path(__file__).parent / "forge_stub" / "extensions-builtin" / "sd_forge_lora"
    loaded = {}
    for name in ("network", "networks", "extra_networks_lora"):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        loaded[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, loaded[name])
        spec.loader.exec_module(loaded[name])
    monkeypatch.setattr(extra_networks, "extra_network_registry", {})
    monkeypatch.setattr(extra_networks, "extra_network_aliases", {})
    networks = loaded["networks"]
    networks.extra_network_lora = loaded["extra_networks_lora"].ExtraNetworkLora()  # lora_script.before_ui
    extra_networks.register_extra_network(networks.extra_network_lora)
    return networks


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


@pytest.mark.parametrize("packages,kind", [(("modules_forge", "backend", "backend/diffusion_engine"), "forge"),
                                            (("modules_forge", "ldm_patched"), "reforge"), ((), "a1111")])
def test_the_host_is_told_apart_at_start_up(tmp_path, packages, kind):
    """Forge 2 has modules_forge and its own backend, reForge's main modules_forge on Forge's first backend
    (ldm_patched), A1111 neither: each gets its own host."""
    import subprocess

    root = tmp_path / "webui"
    for package in packages:
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").touch()
    env = {"PYTHONPATH": f"{root}:{Path(__file__).parents[1]}", "PATH": "/usr/bin:/bin"}
    found = subprocess.run([sys.executable, "-c", "from lohatrain.hosts import kind; print(kind())"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == kind


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
