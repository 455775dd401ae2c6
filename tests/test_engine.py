"""The engine on the tiny real ldm SD1 model: training works, files load in the host's way, runs repeat,
and the model is left exactly as found."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain.families import ldm_parts
from lohatrain.errors import LohatrainError
from lohatrain.settings import TrainSettings
from lohatrain.trainer import Hooks, train

from host_rules import apply_file, find_module, group_keys


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    base = TrainSettings(name="test-loha", dataset_dir=str(dataset), output_dir=str(out), resolution=64,
                         bucket_min_side=64, bucket_max_side=128, steps=6, batch_size=2, learning_rate=3e-3,
                         train_dtype="fp32", save_dtype="fp32", gradient_checkpointing=False, seed=7,
                         ).with_preset("small")
    return dataclasses.replace(base, **overrides)


def model_state(model) -> dict:
    """Everything ModelGuard promises to restore, as comparable values."""
    return {
        "tensors": {k: hashlib.sha256(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                                      if v.dtype != torch.bool else v.numpy().tobytes()).hexdigest()
                    for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()},
        "placement": {k: (str(v.device), str(v.dtype), v.requires_grad) for k, v in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "forwards": {k: "forward" in m.__dict__ for k, m in model.named_modules()},
        "ldm_flags": {k: (m.__dict__.get("checkpoint"), m.__dict__.get("use_checkpoint"))
                      for k, m in model.named_modules()},
    }


@torch.no_grad()
def denoising_loss(model, dataset: Path, seed: int = 0) -> float:
    """Mean prediction error on the dataset's images over fixed noise and timesteps, against the model's own
    target: the noise, or ldm's `get_v` for a v-prediction model."""
    from lohatrain import dataset as ds

    items = ds.scan_dataset(dataset, "txt")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for item in items:
        pixels, _ = ds.prepare_image(ds.load_image(item.path), (64, 64))
        latent = model.get_first_stage_encoding(model.encode_first_stage(pixels[None]))
        cond = model.get_learned_conditioning([item.caption])
        for t in (100, 400, 700):
            noise = torch.randn(latent.shape, generator=gen)
            timestep = torch.tensor([t])
            pred = model.apply_model(model.q_sample(latent, timestep, noise), timestep, cond)
            target = model.get_v(latent, noise, timestep) if model.parameterization == "v" else noise
            total += torch.mean((pred - target) ** 2).item()
    return total / (3 * len(items))


def test_training_lowers_the_loss_and_the_file_carries_it(tiny_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    before = denoising_loss(fresh, sample_dataset)
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=15, learning_rate=1e-2))
    assert result.status == "done" and result.file == tmp_path / "test-loha.safetensors"
    unmatched = apply_file(fresh, load_file(result.file))
    assert unmatched == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.9 * before, (before, after)


def test_applying_the_file_reproduces_the_trained_models_output(tiny_model, sample_dataset, tmp_path):
    fresh = copy.deepcopy(tiny_model)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    seen = {}

    def capture(step, network):
        if step == 5:
            seen["trained"] = tiny_model.apply_model(x, t, tiny_model.get_learned_conditioning(["blue circle"]))

    s = settings_for(sample_dataset, tmp_path, steps=5, text_encoder_lr=1e-3, conv_dim=2, conv_alpha=1)
    train(ldm_parts(tiny_model), s, Hooks(on_step=capture))
    base_out = fresh.apply_model(x, t, fresh.get_learned_conditioning(["blue circle"]))
    assert apply_file(fresh, load_file(tmp_path / "test-loha.safetensors")) == []
    with torch.no_grad():
        file_out = fresh.apply_model(x, t, fresh.get_learned_conditioning(["blue circle"]))
    assert not torch.allclose(base_out, seen["trained"], atol=1e-4)  # the LoHa changed something
    torch.testing.assert_close(file_out, seen["trained"], atol=2e-5, rtol=1e-4)


def expected_unet_targets(unet, conv: bool) -> set[int]:
    """UNet modules a LoHa must cover, enumerated independently of lohatrain's planner: the attention blocks'
    Linears and 1x1 convs, and with `conv` the layers of ResBlocks and down/up-samplers."""
    expected = set()
    for block in unet.modules():
        kind = type(block).__name__
        if kind == "SpatialTransformer" or (conv and kind in ("ResBlock", "Downsample", "Upsample")):
            for m in block.modules():
                if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.Conv2d) and (
                        conv or m.kernel_size == (1, 1))):
                    expected.add(id(m))
    return expected


def modules_the_host_loads(model, tensors: dict) -> tuple[set[int], dict[int, set[str]]]:
    """Each LoHa of a file as the host loads it: all five tensors, a module found by the host's rules and
    factor shapes that fit it. Returns the ids of the modules hit and, per fused attention, which of q, k, v
    landed on it (out lands on its out_proj)."""
    covered, attention_parts = set(), {}
    for layer, w in group_keys(tensors).items():
        assert set(w) == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, layer
        module = find_module(model, layer)
        assert module is not None, f"{layer} matches no module in the host"
        if isinstance(module, torch.nn.MultiheadAttention):  # q/k/v: a third of the fused in_proj_weight
            attention_parts.setdefault(id(module), set()).add(layer.rsplit("_", 2)[-2])
            out_dim, fan_in = module.embed_dim, module.in_proj_weight.shape[1]
        else:
            out_dim, fan_in = module.weight.shape[0], module.weight[0].numel()
        assert w["hada_w1_a"].shape == (out_dim, w["hada_w1_b"].shape[0]) and w["hada_w1_b"].dim() == 2
        assert w["hada_w1_b"].shape[1] == fan_in and w["hada_w2_b"].shape[1] == fan_in
        covered.add(id(module))
    return covered, attention_parts


def _expected_targets(model, conv: bool, text: bool) -> set[int]:
    expected = expected_unet_targets(model.model.diffusion_model, conv)
    if text:
        for name, m in model.cond_stage_model.transformer.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                expected.add(id(m))
    return expected


@pytest.mark.parametrize("conv,text", [(False, False), (True, True)])
def test_every_key_matches_a_module_under_the_hosts_rules(tiny_model, sample_dataset, tmp_path, conv, text):
    s = settings_for(sample_dataset, tmp_path, steps=1, conv_dim=4 if conv else 0, conv_alpha=2,
                     text_encoder_lr=1e-4 if text else 0.0)
    result = train(ldm_parts(tiny_model), s)
    tensors = load_file(result.file)
    covered, _ = modules_the_host_loads(tiny_model, tensors)
    assert covered == _expected_targets(tiny_model, conv, text)
    # SD1 files use the diffusers naming of kohya's tools, including ComfyUI's required `to_out_0`.
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.")
               for k in tensors)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors) == text


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tiny_model, sample_dataset, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    template = copy.deepcopy(tiny_model)
    files = []
    for i, seed in enumerate((11, 11, 12)):
        s = settings_for(sample_dataset, tmp_path / str(i), seed=seed, steps=3, shuffle_tags=True, flip_aug=True)
        files.append(train(ldm_parts(copy.deepcopy(template)), s).file.read_bytes())
    assert files[0] == files[1]
    assert files[0] != files[2]


def test_random_seed_is_recorded_and_replays(tiny_model, sample_dataset, tmp_path):
    template = copy.deepcopy(tiny_model)
    first = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "a", seed=-1, steps=2))
    saved = json.loads((tmp_path / "a" / "test-loha.lohatrain.json").read_text())
    assert saved["seed"] == first.seed >= 0
    replay = train(ldm_parts(template), TrainSettings.from_dict({**saved, "output_dir": str(tmp_path / "b")}))
    a, b = load_file(first.file), load_file(replay.file)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metadata_is_what_the_webui_reads(tiny_model, sample_dataset, tmp_path):
    result = train(dataclasses.replace(ldm_parts(tiny_model), name="tiny.safetensors", hash="abc123"), settings_for(sample_dataset, tmp_path, steps=2))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_output_name"] == "test-loha"
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"
    assert meta["ss_sd_model_name"] == "tiny.safetensors" and meta["ss_sd_model_hash"] == "abc123"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_num_train_images"] == "8" and meta["ss_max_train_steps"] == "2" and meta["ss_seed"] == "7"
    freq = json.loads(meta["ss_tag_frequency"])["dataset"]
    assert freq["simple"] == 8  # every sample caption ends with this tag
    raw = result.file.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    assert result.file.stat().st_mode & 0o777 == 0o666 & ~old_umask  # readable by the WebUI's user
    card = json.loads((tmp_path / "test-loha.json").read_text())
    assert card["sd version"] == "SD1"  # one of the values the WebUI's Lora card knows


@pytest.mark.parametrize("save_dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                     ("fp32", torch.float32)])
def test_save_dtype_is_honoured(tiny_model, sample_dataset, tmp_path, save_dtype, torch_dtype):
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=1, save_dtype=save_dtype))
    assert {t.dtype for t in load_file(result.file).values()} == {torch_dtype}


@pytest.mark.parametrize("train_dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_train_dtype_is_the_unets_compute_dtype(tiny_model, sample_dataset, tmp_path, train_dtype, torch_dtype):
    seen = set()
    hook = tiny_model.model.diffusion_model.out.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    try:
        train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=2, train_dtype=train_dtype))
    finally:
        hook.remove()
    assert seen == {torch_dtype}


def test_gradient_checkpointing_gives_the_same_result(tiny_model, sample_dataset, tmp_path):
    template = copy.deepcopy(tiny_model)
    plain = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "a", steps=3))
    checkpointed = train(ldm_parts(template), settings_for(sample_dataset, tmp_path / "b", steps=3,
                                                gradient_checkpointing=True))
    a, b = load_file(plain.file), load_file(checkpointed.file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-5)


@pytest.mark.parametrize("ending", ["done", "interrupted", "error", "out of memory"])
def test_model_is_left_exactly_as_found(tiny_model, sample_dataset, tmp_path, ending):
    before = model_state(tiny_model)
    out = tmp_path / "out"
    s = settings_for(sample_dataset, out, steps=4, gradient_checkpointing=True, text_encoder_lr=1e-4,
                     conv_dim=2, conv_alpha=1)

    def on_step(step, network):
        if step == 2 and ending == "error":
            raise RuntimeError("boom")
        if step == 2 and ending == "out of memory":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    steps_seen = []
    stop = lambda: ending == "interrupted" and len(steps_seen) >= 2  # noqa: E731
    if ending in ("done", "interrupted"):
        result = train(ldm_parts(tiny_model), s, Hooks(on_step=lambda st, n: steps_seen.append(st), stop=stop))
        assert result.status == ending
        assert result.steps_done == (4 if ending == "done" else 2)
    elif ending == "error":
        with pytest.raises(RuntimeError, match="boom"):
            train(ldm_parts(tiny_model), s, Hooks(on_step=on_step))
    else:
        with pytest.raises(LohatrainError, match="out of GPU memory"):
            train(ldm_parts(tiny_model), s, Hooks(on_step=on_step))
    assert model_state(tiny_model) == before
    files = sorted(p.name for p in out.iterdir())
    if ending in ("error", "out of memory"):
        assert files == ["test-loha.lohatrain-state"]  # nothing half-written, no temp files; resumable
    elif ending == "interrupted":
        assert files == ["test-loha.json", "test-loha.lohatrain-state", "test-loha.lohatrain.json",
                         "test-loha.safetensors"]
    else:
        assert files == ["test-loha.json", "test-loha.lohatrain.json", "test-loha.safetensors"]


def test_interrupted_file_records_the_steps_it_has(tiny_model, sample_dataset, tmp_path):
    done = []
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=50), Hooks(on_step=lambda s, n: done.append(s), stop=lambda: len(done) >= 3))
    assert result.status == "interrupted" and result.steps_done == 3
    with safe_open(result.file, "pt") as f:
        assert f.metadata()["ss_steps"] == "3"


def test_save_every_steps_writes_intermediate_files(tiny_model, sample_dataset, tmp_path):
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=5, save_every_steps=2))
    assert [p.name for p in result.files] == ["test-loha-2.safetensors", "test-loha-4.safetensors",
                                              "test-loha.safetensors"]
    with safe_open(tmp_path / "test-loha-2.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == "2"


def test_progress_reports_step_loss_rate_and_eta(tiny_model, sample_dataset, tmp_path):
    seen = []
    train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=3), Hooks(progress=seen.append))
    steps = [p for p in seen if p.stage == "Training"]
    assert [p.step for p in steps] == [1, 2, 3] and all(p.total == 3 for p in steps)
    assert all(p.loss > 0 and p.smooth_loss > 0 and p.it_per_s > 0 and p.eta_s >= 0 for p in steps)
    assert steps[-1].eta_s == 0


@pytest.mark.parametrize("schedule,warmup,expected", [
    ("constant", 0, [1.0, 1.0, 1.0, 1.0]),
    ("cosine", 0, [1.0, 0.8536, 0.5, 0.1464]),
    ("linear", 2, [0.5, 1.0, 1.0, 0.5]),
])
def test_learning_rate_schedule(tiny_model, sample_dataset, tmp_path, schedule, warmup, expected):
    seen = []
    train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=4, lr_scheduler=schedule,
                                   lr_warmup_steps=warmup, learning_rate=1e-3), Hooks(progress=seen.append))
    lrs = [p.lr / 1e-3 for p in seen if p.stage == "Training"]
    # The rate reported after step k is the one the next step uses.
    assert lrs[:3] == pytest.approx(expected[1:], abs=1e-3)


def test_a_cpu_run_starts_after_one_batch_of_images_and_encodes_each_once(tiny_model, sample_dataset, tmp_path):
    """On a CPU the VAE stays where it is, so each image is encoded when a batch first draws it: the first step
    waits for its own two images, not the dataset's eight, and no image goes through the VAE twice."""
    parts = ldm_parts(tiny_model)
    encoded, at_first_step = [], []
    counting = dataclasses.replace(parts, encode_images=lambda pixels: encoded.append(len(pixels)) or
                                   parts.encode_images(pixels))

    def progress(p):
        if p.stage == "Training" and not at_first_step:
            at_first_step.append(sum(encoded))

    images = len(list(sample_dataset.glob("*.png")))
    train(counting, settings_for(sample_dataset, tmp_path, steps=6, batch_size=2), Hooks(progress=progress))
    assert at_first_step == [2]
    assert sum(encoded) == images  # six steps of two draw every image once an epoch: each encoded once
