"""The engine on the tiny real model of each family (SD1, SD2 768-v, SDXL): training lowers the loss, files load under
the host's rules and reproduce the trained output, another seed gives another file, the model is left exactly as
found; and on SD1 what every run does (seeds, metadata, dtypes, saves, progress, the schedule)."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lohatrain.families import ldm_parts
from lohatrain.errors import LohatrainError
from lohatrain.settings import TrainSettings
from lohatrain.trainer import Hooks, train

from host_rules import apply_file
from runs import (denoising_loss, expected_unet_targets, model_state, modules_the_host_loads, sdxl_conditioning,
                  settings_for)

# What differs between families is the same on every torch: make test-stock runs SD1's case only (-m).
FAMILIES = ["sd1", *(pytest.param(f, marks=pytest.mark.other_families) for f in ("sd2", "sdxl"))]
CLIP_L_WIDTH, BIGG_WIDTH = 32, 48  # the tiny SDXL's text encoders' widths (SDXL: 768 and 1280)

# What a run needs to lower the loss visibly on each tiny model (measured: by 15% on SD1, 11% on SD2's v-loss, 18% on
# SDXL). SDXL: with conv layers, as its default preset (it has no attention on its full-resolution level, and a few
# dozen steps of attention-only LoHa barely move its loss).
LEARNS = {"sd1": dict(steps=8, learning_rate=2e-2), "sd2": dict(steps=20, learning_rate=3e-2),
          "sdxl": dict(steps=8, learning_rate=2e-2, conv_dim=4, conv_alpha=2)}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_the_file_carries_it(family, family_model, sample_dataset, tmp_path):
    """The loss (ε, or v on SD2) goes down on a fresh model with the file applied by the host's rules."""
    fresh = copy.deepcopy(family_model)
    before = denoising_loss(fresh, sample_dataset)
    result = train(ldm_parts(family_model), settings_for(sample_dataset, tmp_path, **LEARNS[family]))
    assert result.status == "done" and result.file == tmp_path / "test-loha.safetensors"
    assert apply_file(fresh, load_file(result.file)) == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.9 * before, (before, after)


def probe(model, family: str) -> tuple:
    """The conditioning of a fixed prompt and the UNet's output for it on a fixed input (SDXL: with an image's
    own sizes in the vector)."""
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    if family == "sdxl":
        cond = sdxl_conditioning(model, ["blue circle"], [(96, 160, 0, 21, 64, 64)])
        return cond, model.model(x, t, cond)
    cond = model.get_learned_conditioning(["blue circle"])
    return cond, model.apply_model(x, t, cond)


@pytest.mark.parametrize("family", FAMILIES)
def test_applying_the_file_reproduces_the_trained_models_output(family, family_model, sample_dataset, tmp_path):
    """UNet with conv layers and the text encoder(s): the file applied by the published formulas gives what the
    model gave at the end of training, conditioning included."""
    fresh = copy.deepcopy(family_model)
    seen = {}

    def capture(step, network):
        if step == 4:
            seen["cond"], seen["out"] = probe(family_model, family)

    s = settings_for(sample_dataset, tmp_path, steps=4, learning_rate=1e-2, text_encoder_lr=1e-2, conv_dim=2,
                     conv_alpha=1)
    train(ldm_parts(family_model), s, Hooks(on_step=capture))
    with torch.no_grad():
        base_cond, base_out = probe(fresh, family)
    assert apply_file(fresh, load_file(tmp_path / "test-loha.safetensors")) == []
    with torch.no_grad():
        file_cond, file_out = probe(fresh, family)
    if family == "sdxl":  # both text encoders' LoHa: CLIP-L's and bigG's halves of crossattn, bigG's pooled vector
        changed = seen["cond"]["crossattn"] - base_cond["crossattn"]
        assert changed[..., :CLIP_L_WIDTH].abs().max() > 1e-3 and changed[..., CLIP_L_WIDTH:].abs().max() > 1e-3
        assert not torch.allclose(base_cond["vector"][:, :BIGG_WIDTH], seen["cond"]["vector"][:, :BIGG_WIDTH])
        for key in ("crossattn", "vector"):
            torch.testing.assert_close(file_cond[key], seen["cond"][key], atol=2e-5, rtol=1e-4)
    else:
        assert not torch.allclose(base_cond, seen["cond"], atol=1e-3)  # the text encoder's LoHa changed it
        torch.testing.assert_close(file_cond, seen["cond"], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(base_out, seen["out"], atol=1e-4)  # the LoHa changed something
    torch.testing.assert_close(file_out, seen["out"], atol=2e-5, rtol=1e-4)


def text_targets(model, family: str) -> set[int]:
    """Text-encoder modules a LoHa must change, enumerated independently of lohatrain's planner: CLIP's attention
    and MLP Linears; for OpenCLIP (SD2, SDXL's bigG) each fused attention with its out_proj, and both MLP Linears."""
    expected = set()

    def clip(transformer):
        for layer in transformer.text_model.encoder.layers:
            expected.update(id(m) for m in layer.modules() if isinstance(m, nn.Linear))

    def open_clip(model):
        for block in model.transformer.resblocks:
            expected.update({id(block.attn), id(block.attn.out_proj), id(block.mlp.c_fc), id(block.mlp.c_proj)})

    if family == "sd1":
        clip(model.cond_stage_model.transformer)
    elif family == "sd2":
        open_clip(model.cond_stage_model.model)
    else:
        clip(model.conditioner.embedders[0].transformer)
        open_clip(model.conditioner.embedders[1].model)
    return expected


def fused_attentions(model, family: str) -> int:
    if family == "sd1":
        return 0
    encoder = model.cond_stage_model.model if family == "sd2" else model.conditioner.embedders[1].model
    return len(encoder.transformer.resblocks)


@pytest.mark.parametrize("conv,text", [(False, False), (True, True)], ids=["attention", "conv+text"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_key_matches_a_module_under_the_hosts_rules(family, family_model, sample_dataset, tmp_path, conv,
                                                          text):
    s = settings_for(sample_dataset, tmp_path, steps=1, conv_dim=4 if conv else 0, conv_alpha=2,
                     text_encoder_lr=1e-4 if text else 0.0)
    tensors = load_file(train(ldm_parts(family_model), s).file)
    covered, attention_parts = modules_the_host_loads(family_model, tensors)
    expected = expected_unet_targets(family_model.model.diffusion_model, conv)
    assert covered == (expected | text_targets(family_model, family) if text else expected)
    # The host applies a fused attention's LoHa only when q, k, v (and out) are all there.
    assert all(parts == {"q", "k", "v"} for parts in attention_parts.values())
    assert len(attention_parts) == (fused_attentions(family_model, family) if text else 0)
    if family == "sdxl":  # ldm's names; SD1's diffusers names would miss
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.") for k in tensors)
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in tensors)
        return
    # SD1 and SD2 files use the diffusers naming of kohya's tools, including ComfyUI's required `to_out_0`.
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.")
               for k in tensors)
    for name in ("self_attn_q_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"):
        assert any(k.startswith(f"lora_te_text_model_encoder_layers_0_{name}.") for k in tensors) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_another_seed_gives_another_file(family, family_model, sample_dataset, tmp_path, monkeypatch):
    """(The same seed gives the same bytes: tests/test_golden.py, for every type and family.)"""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    files = []
    for seed in (11, 12):
        s = settings_for(sample_dataset, tmp_path / str(seed), seed=seed, steps=2, shuffle_tags=True, flip_aug=True,
                         text_encoder_lr=1e-3)
        files.append(train(ldm_parts(copy.deepcopy(family_model)), s).file.read_bytes())
    assert files[0] != files[1]


ENDINGS = [("sd1", "done"), ("sd1", "interrupted"), ("sd1", "error"), ("sd1", "out of memory"),
           *(pytest.param(f, e, marks=pytest.mark.other_families, id=f"{f}-{e}")
             for f in ("sd2", "sdxl") for e in ("done", "error"))]


@pytest.mark.parametrize("family,ending", ENDINGS)
def test_model_is_left_exactly_as_found(family, family_model, sample_dataset, tmp_path, ending):
    """Every way a run ends, with gradient checkpointing, the text encoder(s) and conv layers trained (SD2: with
    the zero-terminal-SNR schedule); only whole files are left, and after a failure the run's state to resume."""
    before = model_state(family_model)
    trainable = [e.is_trainable for e in family_model.conditioner.embedders] if family == "sdxl" else None
    out = tmp_path / "out"
    s = settings_for(sample_dataset, out, steps=4, gradient_checkpointing=True, text_encoder_lr=1e-4,
                     conv_dim=2, conv_alpha=1, zero_terminal_snr=family == "sd2")

    def on_step(step, network):
        if step == 2 and ending == "error":
            raise RuntimeError("boom")
        if step == 2 and ending == "out of memory":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    steps_seen = []
    stop = lambda: ending == "interrupted" and len(steps_seen) >= 2  # noqa: E731
    if ending in ("done", "interrupted"):
        result = train(ldm_parts(family_model), s,
                       Hooks(on_step=lambda st, n: steps_seen.append(st), stop=stop))
        assert result.status == ending
        assert result.steps_done == (4 if ending == "done" else 2)
    elif ending == "error":
        with pytest.raises(RuntimeError, match="boom"):
            train(ldm_parts(family_model), s, Hooks(on_step=on_step))
    else:
        with pytest.raises(LohatrainError, match="out of GPU memory"):
            train(ldm_parts(family_model), s, Hooks(on_step=on_step))
    assert model_state(family_model) == before
    if family == "sdxl":
        assert [e.is_trainable for e in family_model.conditioner.embedders] == trainable
    files = sorted(p.name for p in out.iterdir())
    if ending in ("error", "out of memory"):
        assert files == ["test-loha.lohatrain-state"]  # nothing half-written, no temp files; resumable
    elif ending == "interrupted":
        assert files == ["test-loha.json", "test-loha.lohatrain-state", "test-loha.lohatrain.json",
                         "test-loha.safetensors"]
    else:
        assert files == ["test-loha.json", "test-loha.lohatrain.json", "test-loha.safetensors"]


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
