"""Training reForge `main`'s loaded model (A1111's model object on Forge's first backend) through lohatrain, on the
reForge stand-in (tests/reforge_stub, written from reForge's source): the user's LoRA, merged by reForge's UNet patcher,
is off for the run and back after; a UNet the memory manager left in CPU memory is loaded whole for the run (or the run
is refused); SD 2.x trains through reForge's transformers CLIP and its file loads with reForge's key rules; and each
time the model is left as found (weights, their inference status, devices, patches, loaded patchers)."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lohatrain.ldm_importable  # noqa: F401  (before the stand-in imports ldm)

sys.path.insert(0, str(Path(__file__).parent / "reforge_stub"))
sys.path.insert(0, str(Path(__file__).parent / "webui_stub"))  # reForge keeps A1111's `modules`

import reforge_host  # noqa: E402
from ldm_patched.modules import model_management as memory  # noqa: E402
from ldm_patched.modules.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from users_loras import text_encoder_lora  # noqa: E402

from lohatrain.errors import LohatrainError  # noqa: E402
from lohatrain.jobs import Job  # noqa: E402
from lohatrain.hosts.reforge import ReForgeHost  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402
from lohatrain.trainer import Hooks, train  # noqa: E402
from lohatrain.webui import actions  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_memory_manager():
    memory.current_loaded_models.clear()
    yield
    memory.current_loaded_models.clear()
    memory.total_vram, memory.minimum_inference_memory = math.inf, 0


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    base = TrainSettings(name="reforge", dataset_dir=str(dataset), output_dir=str(out), resolution=64,
                         bucket_min_side=64, bucket_max_side=128, steps=3, batch_size=2, learning_rate=3e-3,
                         train_dtype="fp32", save_dtype="fp32", gradient_checkpointing=False, seed=7,
                         ).with_preset("small")
    return dataclasses.replace(base, **overrides)


def train_on(sd_model, settings: TrainSettings, **hooks):
    """A run on reForge's model as lohatrain's reForge host makes it: the model's parts, in the host's session."""
    host = ReForgeHost(memory)
    parts = host.parts_of(sd_model)
    with host.session(parts) as load_unet:
        return train(parts, settings, Hooks(load_unet=load_unet, **hooks))


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().clone().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def parts(sd_model) -> dict:
    objects = sd_model.forge_objects_original
    return {"unet": objects.unet.model, "vae": objects.vae.model, "clip": objects.clip.model}


def reforge_state(sd_model) -> dict:
    """What a run must leave as it found it: every tensor of the UNet, VAE and text encoder (value, inference
    status, requires_grad, dtype), where each part is, the UNet's patches (merged uuid, backup) and forwards, which
    patchers are loaded (not in which order: that is the manager's own record of use), and the objects txt2img
    samples."""
    base = sd_model.forge_objects_original.unet.model
    return {
        "tensors": {(part, name): (t.is_inference(), t.requires_grad, t.dtype, _digest(t))
                    for part, module in parts(sd_model).items()
                    for name, t in [*module.named_parameters(), *module.named_buffers()]},
        "where": {part: (module.device is memory.gpu, module.model_lowvram) for part, module in parts(sd_model).items()},
        "unet_patches": (base.current_weight_patches_uuid, sorted(sd_model.forge_objects_original.unet.backup)),
        "forwards": {name: "forward" in m.__dict__ for name, m in base.named_modules()},
        "modes": {name: m.training for name, m in base.named_modules()},
        "loaded": sorted(id(m.model) for m in memory.current_loaded_models),  # the order is the manager's LRU
        "objects": (sd_model.forge_objects, sd_model.forge_objects.unet, sd_model.forge_objects_after_applying_lora,
                    sd_model.forge_objects_after_applying_lora.unet),
    }


def parameter_objects(sd_model) -> dict:
    return {(part, name): id(p) for part, module in parts(sd_model).items() for name, p in module.named_parameters()}


USERS_LORA_LAYERS = ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in")


def a_users_lora(sd_model) -> dict:
    """A small LoRA on two layers, as a user might have had in the last prompt."""
    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for path in USERS_LORA_LAYERS:
        weight = sd_model.model.diffusion_model.get_submodule(path).weight
        key = "lora_unet_" + path.replace(".", "_")
        tensors[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=gen) * 0.5
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, weight[0].numel(), generator=gen).reshape(
            2, *weight.shape[1:])
    return tensors


@pytest.mark.parametrize("previews", [False, True])
def test_the_users_lora_is_off_for_the_run_and_back_after(previews, sample_dataset, tmp_path):
    sd_model = reforge_host.load_model_for_a1111("sd1")
    base = sd_model.forge_objects_original.unet.model
    checkpoint = {k: v.clone() for k, v in base.diffusion_model.state_dict().items()}
    users = [("mine", a_users_lora(sd_model))]
    with_lora, _ = reforge_host.txt2img(sd_model, "blue circle", users)
    # As in reForge: the generation left the user's LoRA merged into the weights, which are inference tensors now,
    # and txt2img with extra networks off still samples that prompt's patcher.
    weights = base.diffusion_model.state_dict()
    merged = [k for k in checkpoint if not torch.equal(weights[k], checkpoint[k])]
    assert sorted(merged) == sorted(f"{path}.weight" for path in USERS_LORA_LAYERS)
    assert all(p.is_inference() for p in base.diffusion_model.parameters())
    torch.testing.assert_close(reforge_host.txt2img(sd_model, "blue circle")[0], with_lora)
    before = reforge_state(sd_model)
    seen = []

    def on_step(step, network):
        if previews:  # the host's preview: txt2img with extra networks off (the network attached)
            reforge_host.txt2img(sd_model, "a preview")
        weights = base.diffusion_model.state_dict()
        seen.append(all(torch.equal(weights[k], checkpoint[k]) for k in checkpoint))

    parts = ReForgeHost(memory).parts_of(sd_model)
    assert parts.family.name == "sd1" and parts.managed
    result = train_on(sd_model, settings_for(sample_dataset, tmp_path), on_step=on_step)
    assert result.status == "done" and seen == [True] * 3  # trained on the checkpoint's weights, LoRA off
    # Loading the user's patcher again merged its LoRA again (into new Parameters, as reForge's every load does).
    assert reforge_state(sd_model) == before
    again, _ = reforge_host.txt2img(sd_model, "blue circle", users)
    torch.testing.assert_close(again, with_lora, rtol=0, atol=0)


def test_a_unet_left_in_cpu_memory_is_loaded_whole_for_the_run_and_unloaded_after(sample_dataset, tmp_path):
    sd_model = reforge_host.load_model_for_a1111("sd1")
    base = sd_model.forge_objects_original.unet.model
    reforge_host.txt2img(sd_model, "blue circle")
    size = memory.module_size(base)
    # A small GPU: room for the UNet and a step, and every VAE or text-encoder load unloads the UNet (to CPU memory).
    memory.total_vram, memory.minimum_inference_memory = 3 * size + 1, 2 * size
    with torch.inference_mode():  # as when a generation's VAE needed the room
        memory.unload_all_models()
    assert base.device is memory.cpu and all(p.is_inference() for p in base.parameters())
    before, objects = reforge_state(sd_model), parameter_objects(sd_model)
    on_gpu = []

    def on_step(step, network):
        on_gpu.append(base.device is memory.gpu and not base.model_lowvram
                      and not any(p.is_inference() for p in base.parameters()))
        reforge_host.txt2img(sd_model, "a preview")  # unloads the UNet again (for the VAE)

    result = train_on(sd_model, settings_for(sample_dataset, tmp_path), on_step=on_step)
    assert result.status == "done" and on_gpu == [True] * 3 and all(math.isfinite(x) for x in result.losses)
    assert reforge_state(sd_model) == before and parameter_objects(sd_model) == objects


def test_a_run_holds_no_second_copy_of_reforges_weights(sample_dataset, tmp_path, live_tensor_bytes):
    """After a generation reForge's weights are inference tensors; the run trains on those very weights (issue: the
    real reForge kept about 3 GB more after runs)."""
    sd_model = reforge_host.load_model_for_a1111("sd1")
    reforge_host.txt2img(sd_model, "blue circle")
    unet_bytes = memory.module_size(sd_model.forge_objects_original.unet.model)
    before, during = live_tensor_bytes(), []

    def on_step(step, network):
        with torch.inference_mode():  # the host moves the UNet meanwhile, as for a preview on a small GPU
            memory.unload_all_models()
        during.append(live_tensor_bytes() - before)

    train_on(sd_model, settings_for(sample_dataset, tmp_path), on_step=on_step)
    assert max(during) < unet_bytes / 2, (max(during), unet_bytes)  # the network, its optimizer, the latents
    assert live_tensor_bytes() - before < unet_bytes / 2  # and nothing of the run is kept afterwards


def test_a_unet_reforge_would_load_only_in_part_is_refused_and_left_as_found(sample_dataset, tmp_path):
    sd_model = reforge_host.load_model_for_a1111("sd1")
    reforge_host.txt2img(sd_model, "blue circle")
    with torch.inference_mode():
        memory.unload_all_models()
    memory.total_vram = 2.5 * memory.module_size(sd_model.forge_objects_original.unet.model)
    before, objects = reforge_state(sd_model), parameter_objects(sd_model)
    with pytest.raises(LohatrainError, match="could not fit the whole UNet"):
        train_on(sd_model, settings_for(sample_dataset, tmp_path))
    assert reforge_state(sd_model) == before and parameter_objects(sd_model) == objects


def test_sd2_trains_through_reforges_transformers_clip_and_the_file_loads_with_its_rules(sample_dataset, tmp_path):
    sd_model = reforge_host.load_model_for_a1111("sd2")
    assert not sd_model.is_sd2 and sd_model.is_sd1  # reForge looks for a `model` on the wrapper, which it lacks
    parts = ReForgeHost(memory).parts_of(sd_model)
    assert parts.family.name == "sd2" and parts.text_encoder is sd_model.cond_stage_model.wrapped.transformer
    reforge_host.txt2img(sd_model, "blue circle")
    before = reforge_state(sd_model)
    probe = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500])
    seen = {}

    def on_step(step, network):
        if step == 3:  # the trained UNet and text encoder, as reForge would sample them
            seen["trained"] = sd_model.apply_model(*probe, sd_model.get_learned_conditioning(["red square"]))

    settings = settings_for(sample_dataset, tmp_path, training_method="lora", text_encoder_lr=1e-3)
    result = train_on(sd_model, settings, on_step=on_step)
    assert result.status == "done" and result.metadata["ss_v2"] == "True"
    assert result.metadata["ss_v_parameterization"] == "True"
    assert reforge_state(sd_model) == before

    # The file as reForge's Lora extension applies it (ComfyUI's key rules: every key matched, text encoder too).
    tensors = load_file(result.file)
    unet, clip = sd_model.forge_objects_original.unet.clone(), sd_model.forge_objects_original.clip
    unet_patches, rest = load_lora(tensors, model_lora_keys_unet(unet.model))
    clip_patches, unmatched = load_lora(rest, model_lora_keys_clip(clip.model))
    assert unmatched == {} and clip_patches
    output = lambda: sd_model.apply_model(*probe, sd_model.get_learned_conditioning(["red square"]))  # noqa: E731
    with torch.no_grad():  # reForge's weights are inference tensors now: outside no_grad even a forward is refused
        pure = output()
    patched_clip = clip.clone()
    unet.add_patches(unet_patches)
    patched_clip.patcher.add_patches(clip_patches)
    sd_model.forge_objects.unet, sd_model.forge_objects.clip = unet, patched_clip
    with torch.inference_mode():
        memory.load_models_gpu([unet, patched_clip.patcher])
    with torch.no_grad():
        applied = output()
    assert not torch.allclose(pure, seen["trained"], atol=1e-4)
    torch.testing.assert_close(applied, seen["trained"], atol=2e-5, rtol=1e-4)


@pytest.fixture
def reforge_job_host(tmp_path, monkeypatch):
    """lohatrain's host adapter as it starts in reForge (its memory manager found), on the WebUI stand-in's `modules`
    (reForge keeps A1111's API there), with reForge's Lora extension's cache of the files it read."""
    stub = str(Path(__file__).parent / "webui_stub")
    if stub not in sys.path:
        sys.path.insert(0, stub)
    import networks
    import reforge_webui
    from modules import sd_models, shared

    from lohatrain import hosts

    host = ReForgeHost(memory)
    monkeypatch.setattr(hosts, "_current", host)
    monkeypatch.setattr(networks, "load_lora_state_dict", reforge_webui.load_lora_state_dict, raising=False)
    reforge_webui.load_lora_state_dict.cache_clear()
    monkeypatch.setattr(sd_models, "model_data", sd_models.SdModelData())
    monkeypatch.setattr(shared.cmd_opts, "lora_dir", str(tmp_path / "Lora"))
    (tmp_path / "Lora").mkdir()
    yield host, shared


def test_the_hosts_job_takes_the_users_lora_off_and_leaves_reforges_model_as_found(reforge_job_host, sample_dataset):
    from types import SimpleNamespace

    host, shared = reforge_job_host
    sd_model = reforge_host.load_model_for_a1111("sd1")
    sd_model.sd_checkpoint_info = SimpleNamespace(filename="/models/tiny.safetensors", sha256="f0f0", name="tiny")
    shared.sd_model = sd_model
    checkpoint = {k: v.clone() for k, v in sd_model.model.diffusion_model.state_dict().items()}
    users = [("mine", a_users_lora(sd_model))]
    reforge_host.txt2img(sd_model, "blue circle", users)
    before = reforge_state(sd_model)

    settings = settings_for(sample_dataset, Path("unused"), name="reforge_job", steps=2, shuffle_tags=True)
    job = Job("reforge", actions.preflight(settings, via="tab"))
    job_report = job.report

    def report(progress):  # every step: the checkpoint's weights under the network, the UNet whole on the GPU
        weights = sd_model.model.diffusion_model.state_dict()
        assert all(torch.equal(weights[k], checkpoint[k]) for k in checkpoint)
        assert sd_model.forge_objects_original.unet.model.device is memory.gpu
        job_report(progress)

    job.report = report
    result = actions.run_training(job)
    assert result.status == "done" and len(job.losses) == 2
    assert reforge_state(sd_model) == before
    assert "SDXL text encoders" in host.notes[0]


@pytest.fixture
def reforge_txt2img(reforge_job_host, monkeypatch):
    """reForge's txt2img and Lora extension in place of the WebUI stand-in's (tests/reforge_stub/reforge_webui.py),
    with the tiny SD1 loaded as `shared.sd_model`."""
    import networks
    import reforge_webui
    from modules import processing

    host, shared = reforge_job_host
    monkeypatch.setattr(processing, "process_images", reforge_webui.process_images)
    monkeypatch.setattr(networks, "load_networks", reforge_webui.load_networks)
    sd_model = reforge_host.load_model_for_a1111("sd1")
    sd_model.sd_checkpoint_info = SimpleNamespace(filename="/models/tiny.safetensors", sha256="f0f0", name="tiny",
                                                  name_for_extra="tiny", title="tiny.safetensors")
    sd_model.sd_model_hash = "f0f0"
    shared.sd_model = sd_model
    yield host, sd_model, Path(shared.cmd_opts.lora_dir)


def generate(prompt: str, **kwargs) -> np.ndarray:
    """One 64 px image through the host's txt2img (reForge's, here), as a user would make it."""
    from modules import processing, scripts

    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=5, steps=3, sampler_name="DPM++ 2M",
                                                    width=64, height=64, do_not_save_grid=True,
                                                    do_not_save_samples=True, **kwargs)
    p.scripts = scripts.ScriptRunner()  # the host's txt2img tab and route always give one
    (image,) = processing.process_images(p).images
    return np.asarray(image, dtype=np.int16)


def as_found(sd_model) -> dict:
    """reforge_state plus the Lora extension's record of the last prompt's LoRAs, without `requires_grad`: reForge
    puts each weight it unpatches back as a new Parameter that does not require grad (ldm_patched's
    `set_attr_param`), as after any generation with a LoRA followed by one without."""
    state = reforge_state(sd_model)
    tensors = {key: (inference, dtype, digest) for key, (inference, _, dtype, digest) in state["tensors"].items()}
    return {**state, "tensors": tensors, "lora_hash": sd_model.current_lora_hash}


def test_the_grid_on_reforge_is_its_own_images_and_leaves_its_lora_state_as_found(reforge_txt2img, sample_dataset):
    host, sd_model, lora_dir = reforge_txt2img
    settings = settings_for(sample_dataset, lora_dir, name="grid-run", steps=2, save_every_steps=1,
                            learning_rate=2e-2, preview_steps=3, preview_seed=5, preview_prompts=["blue circle"])
    assert train_on(sd_model, settings).status == "done"
    save_file(a_users_lora(sd_model), str(lora_dir / "users.safetensors"))
    with_users = generate("blue circle <lora:users:1>")  # the user's last generation: their LoRA merged
    before = as_found(sd_model)

    made = actions.make_grid("grid-run", strengths=[0.5, 1], seed=5)
    assert as_found(sd_model) == before
    # Extra networks off (a preview, an API call): reForge samples the user's LoRA again, not the grid's last cell.
    np.testing.assert_array_equal(generate("blue circle", disable_extra_networks=True), with_users)
    assert [c.label for c in made.plan.columns] == ["No LoRA", "Step 1", "Step 2"]
    (cells,) = made.cells
    rows = [[np.asarray(cell, dtype=np.int16) for cell in row] for row in cells]
    plain = generate("blue circle")
    assert all(np.array_equal(row[0], plain) for row in rows)  # the no-LoRA column is reForge's plain txt2img
    assert not np.array_equal(rows[1][2], plain) and not np.array_equal(rows[1][2], with_users)
    np.testing.assert_array_equal(rows[1][2], generate("blue circle <lora:grid-run:1>"))


def test_previews_on_reforge_go_through_its_txt2img_and_the_run_writes_its_file(reforge_txt2img, sample_dataset,
                                                                                 run_job):
    """reForge's processing reads `p.scripts` unchecked: a preview without a scripts runner ended the run in error
    after step 1, with no file written."""
    host, sd_model, lora_dir = reforge_txt2img
    settings = settings_for(sample_dataset, lora_dir, name="previewed", steps=2, preview_every_steps=1,
                            preview_steps=3, preview_prompts=["blue circle"])
    result, job = run_job(settings)
    assert result.status == "done" and result.file == lora_dir / "previewed.safetensors" and result.file.is_file()
    previews = sorted((lora_dir / "previewed.previews").glob("step-*.png"))
    assert [p.name for p in previews] == ["step-000001.png", "step-000002.png"]
    assert Path(job.preview) == previews[-1]


def test_the_users_text_encoder_lora_is_off_while_a_run_encodes_its_captions(reforge_txt2img, sample_dataset,
                                                                             run_job):
    """The real reForge: step-1 loss 0.99362 right after a `<lora:…>` generation with text-encoder layers, 1.11601
    after a plain one. Its text path loads `forge_objects.clip.patcher`, the last prompt's LoRA clone."""
    host, sd_model, lora_dir = reforge_txt2img
    users = {**a_users_lora(sd_model), **text_encoder_lora(sd_model.cond_stage_model.wrapped.transformer)}
    save_file(users, str(lora_dir / "users.safetensors"))
    settings = settings_for(sample_dataset, lora_dir, steps=1)

    def first_loss(name: str) -> float:
        run = dataclasses.replace(settings, name=name)
        return run_job(run)[0].losses[0]

    generate("blue circle <lora:users:1>")
    assert sd_model.forge_objects.clip.patcher.patches  # reForge merged the user's text-encoder LoRA
    after_lora = first_loss("after-lora")
    generate("blue circle")
    assert after_lora == first_loss("after-plain")
    generate("blue circle <lora:users:1>")
    with_users = sd_model.get_learned_conditioning(["blue circle"])
    after_lora_again = first_loss("after-lora-again")
    # and it is back afterwards: the next encoding applies the user's LoRA as before the run
    assert after_lora_again == after_lora
    torch.testing.assert_close(sd_model.get_learned_conditioning(["blue circle"]), with_users, rtol=0, atol=0)


def test_a_file_a_run_rewrote_is_read_again_after_the_lora_list_refresh(reforge_txt2img):
    """reForge's Lora extension keeps the files it read by name; the refresh that follows a run clears that."""
    host, sd_model, lora_dir = reforge_txt2img
    save_file(a_users_lora(sd_model), str(lora_dir / "users.safetensors"))
    host.refresh_loras()
    first = generate("blue circle <lora:users:1>")
    save_file({k: -v for k, v in a_users_lora(sd_model).items() if "up" in k} | {
        k: v for k, v in a_users_lora(sd_model).items() if "down" in k}, str(lora_dir / "users.safetensors"))
    host.refresh_loras()
    generate("blue circle")  # another prompt in between: reForge compares it with the last one, not the files
    rewritten = generate("blue circle <lora:users:1>")
    assert not np.array_equal(first, rewritten)
