"""What the user chooses (captions, augmentation, buckets) reaches the loop, and every input a user can get
wrong stops the run with a clear message, nothing written and the model untouched."""
from __future__ import annotations

import dataclasses

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lohatrain.families import ldm_parts
from lohatrain import compat
from lohatrain.errors import LohatrainError
from lohatrain.settings import SettingsError
from lohatrain.cache import CAPTION_BATCH
from lohatrain.trainer import train

from runs import model_state, settings_for


def recording_encoder(model, seen: list):
    def encode(prompts):
        seen.append(list(prompts))
        return model.get_learned_conditioning(prompts)
    return encode


def captions_of(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text().strip() for p in folder.glob("*.txt")}


@pytest.mark.parametrize("mode,phrase", [("none", ""), ("phrase", "sks cat"), ("txt", "")])
def test_caption_mode_decides_what_each_image_is_trained_with(tiny_model, sample_dataset, tmp_path, mode, phrase):
    seen: list = []
    train(dataclasses.replace(ldm_parts(tiny_model), prompt_encoder=lambda _skip: recording_encoder(tiny_model, seen)), settings_for(sample_dataset, tmp_path / "out", steps=2, caption_mode=mode, caption_phrase=phrase))
    prompts = {p for batch in seen for p in batch}
    expected = {"none": {""}, "phrase": {"sks cat"}, "txt": set(captions_of(sample_dataset).values())}[mode]
    assert prompts == expected


def test_shuffled_tags_keep_the_first_tokens_and_change_order(tiny_model, sample_dataset, tmp_path):
    seen: list = []
    train(dataclasses.replace(ldm_parts(tiny_model), prompt_encoder=lambda _skip: recording_encoder(tiny_model, seen)), settings_for(sample_dataset, tmp_path / "out", steps=12, shuffle_tags=True, keep_tokens=1))
    originals = {tuple(sorted(c.split(", "))): c for c in captions_of(sample_dataset).values()}
    reordered = 0
    for prompt in (p for batch in seen for p in batch):
        original = originals[tuple(sorted(prompt.split(", ")))]  # same tags, maybe in another order
        assert prompt.split(", ")[0] == original.split(", ")[0]
        reordered += prompt != original
    assert reordered > 0


def test_each_distinct_caption_goes_through_the_text_encoder_once_in_batched_passes(tiny_model, sample_dataset,
                                                                                    tmp_path):
    """"Encoding captions" costs one text-encoder pass per CAPTION_BATCH distinct captions, not one per image
    or caption: images two to a caption, a few captions more than a pass holds, take two passes, each caption
    in exactly one."""
    folder = tmp_path / "shared"
    folder.mkdir()
    images = sorted(sample_dataset.glob("*.png"))
    distinct = [f"tag{i}, simple background" for i in range(CAPTION_BATCH + 4)]
    for i in range(2 * len(distinct)):
        shutil.copy(images[i % len(images)], folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(distinct[i // 2])
    seen: list = []
    train(dataclasses.replace(ldm_parts(tiny_model), prompt_encoder=lambda _skip: recording_encoder(tiny_model, seen)), settings_for(folder, tmp_path / "out", steps=1))
    assert sorted(p for batch in seen for p in batch) == sorted(distinct)
    assert len(seen) == 2


def count_vae_encodes(model, monkeypatch) -> list:
    calls = []
    real = model.encode_first_stage

    def counting(x):
        calls.append(x.shape[0])
        return real(x)
    monkeypatch.setattr(model, "encode_first_stage", counting)
    return calls


@pytest.mark.parametrize("flip,color,expected", [(False, False, 8), (True, False, 16), (False, True, 8 + 4 * 2)])
def test_augmentations_cost_the_vae_passes_the_docs_say(tiny_model, sample_dataset, tmp_path, monkeypatch,
                                                        flip, color, expected):
    """Over one epoch (4 steps of 2 draw each of the 8 images once): each image once, twice with flips, and with
    colour augmentation once more per draw."""
    calls = count_vae_encodes(tiny_model, monkeypatch)
    train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "out", steps=4, flip_aug=flip, color_aug=color))
    assert sum(calls) == expected


@pytest.mark.parametrize("bucketing", [True, False])
def test_bucketing_groups_images_by_aspect_ratio(tiny_model, sample_dataset, tmp_path, bucketing):
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "out", steps=1, bucketing=bucketing,
                                            resolution=256, bucket_max_side=512))
    with safe_open(result.file, "pt") as f:
        buckets = json.loads(f.metadata()["ss_bucket_info"])["buckets"].values()
    sizes = {tuple(b["resolution"]) for b in buckets}
    assert sum(b["count"] for b in buckets) == 8
    if bucketing:
        assert len(sizes) > 1 and all(w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    else:
        assert sizes == {(256, 256)}


def _assert_refused(model, settings, message, out: Path):
    before = model_state(model)
    with pytest.raises(LohatrainError, match=message):
        train(ldm_parts(model), settings)
    assert model_state(model) == before
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["test-loha.safetensors"])


def test_empty_folder(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_refused(tiny_model, settings_for(tmp_path / "empty", tmp_path / "out"), "No images found",
                    tmp_path / "out")


def test_broken_image_is_named(tiny_model, sample_dataset, tmp_path):
    data = (sample_dataset / "sample_03.png").read_bytes()
    (sample_dataset / "sample_03.png").write_bytes(data[: len(data) // 2])
    _assert_refused(tiny_model, settings_for(sample_dataset, tmp_path / "out"), "sample_03.png", tmp_path / "out")


def test_missing_captions_are_named(tiny_model, sample_dataset, tmp_path):
    (sample_dataset / "sample_01.txt").unlink()
    (sample_dataset / "sample_06.txt").unlink()
    _assert_refused(tiny_model, settings_for(sample_dataset, tmp_path / "out"),
                    r"2 caption file\(s\) are missing: sample_01.txt, sample_06.txt", tmp_path / "out")


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "", "..", "CON", "x\\y"])
def test_names_that_would_leave_the_lora_folder_are_refused(tiny_model, sample_dataset, tmp_path, name):
    with pytest.raises(SettingsError, match="name"):
        train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "out", name=name))
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil.safetensors").exists()


def test_existing_file_is_not_overwritten_unless_asked(tiny_model, sample_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "test-loha.safetensors").write_bytes(b"precious")
    _assert_refused(tiny_model, settings_for(sample_dataset, out), "already exists", out)
    assert (out / "test-loha.safetensors").read_bytes() == b"precious"
    train(ldm_parts(tiny_model), settings_for(sample_dataset, out, steps=1, overwrite=True))
    assert (out / "test-loha.safetensors").read_bytes() != b"precious"


def test_half_precision_model_cannot_train_in_fp32(tiny_model, sample_dataset, tmp_path):
    tiny_model.model.diffusion_model.half()
    _assert_refused(tiny_model, settings_for(sample_dataset, tmp_path / "out", train_dtype="fp32"),
                    "--no-half", tmp_path / "out")


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB filesystem: writing a LoHa there fails with ENOSPC as on a full disk."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_leaves_nothing_half_written(tiny_model, sample_dataset, small_disk):
    before = model_state(tiny_model)
    with pytest.raises(LohatrainError, match="disk holding .* is full"):
        train(ldm_parts(tiny_model), settings_for(sample_dataset, small_disk, steps=1).with_preset("highest"))
    assert list(small_disk.iterdir()) == []
    assert model_state(tiny_model) == before


@pytest.mark.skipif(not compat.autocast_supports("cpu", torch.float16),
                    reason="fp16 convolutions on the CPU need torch 2.3 or later (the stock WebUI's 2.1.2 has none)")
def test_a_vae_that_overflows_in_fp16_encodes_again_in_float32(tiny_model, sample_dataset, tmp_path):
    """SDXL's own VAE gives NaN in fp16 (why the WebUI has --no-half-vae): the run goes on with float32
    latents, and the half-precision VAE is half precision again afterwards."""
    vae = tiny_model.first_stage_model
    with torch.no_grad():
        vae.encoder.conv_in.bias += 6e4  # fits fp16, but the group norm after it overflows
        vae.half()
        assert not torch.isfinite(tiny_model.encode_first_stage(torch.zeros(1, 3, 64, 64).half()).mean).all()
    before = model_state(tiny_model)
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=2, train_dtype="fp16"))
    assert result.status == "done" and all(math.isfinite(loss) for loss in result.losses)
    assert model_state(tiny_model) == before and next(vae.parameters()).dtype == torch.float16
