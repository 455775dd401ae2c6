"""The Forge 2 stand-in (tests/forge_stub) as tests drive it: a run on Forge's engine through lohatrain's Forge
host, what a run must leave as it found it, a user's LoRA, Forge's txt2img and Lora extension in the WebUI stand-in.
Importing this module puts the Forge stand-in and the WebUI stand-in (Forge keeps A1111's `modules`) on sys.path; the
`forge_memory` and `forge_host` fixtures are in conftest.py."""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import torch

import lohatrain.ldm_importable  # noqa: F401  (before the stand-in imports ldm)

for _stub in ("forge_stub", "webui_stub"):
    if str(Path(__file__).parent / _stub) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent / _stub))

from backend import memory_management  # noqa: E402
from packages_3rdparty.comfyui_lora_collection.lora import load_lora, model_lora_keys_unet  # noqa: E402

from lohatrain.hosts.forge import ForgeHost  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402
from lohatrain.trainer import Hooks, train  # noqa: E402

from runs import settings_for as _settings_for  # noqa: E402


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    """A 4-step run named "forge"."""
    return _settings_for(dataset, out, **{"name": "forge", "steps": 4, **overrides})


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
