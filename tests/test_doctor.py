"""The dataset doctor on generated folders: each kind of problem found and named by its file, none in a
clean folder (the demo's sample images)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lohatrain import doctor
from lohatrain.dataset import DatasetError


def noise(seed: int, size=(256, 256)) -> Image.Image:
    """A picture with structure at every scale (blurred noise), different for every seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


@pytest.fixture
def troubled(tmp_path):
    folder = tmp_path / "troubled"
    folder.mkdir()
    captions = {}
    for i in range(5):
        noise(i).save(folder / f"good{i}.png")
        captions[f"good{i}"] = f"mychar, pose {i}, outdoors"
    noise(0).save(folder / "zcopy-of-good0.png")  # the same pixels under another name
    noise(1).resize((200, 200)).save(folder / "zresaved-good1.jpg", quality=85)  # resized and re-encoded
    captions["zcopy-of-good0"] = captions["zresaved-good1"] = "mychar, copy"
    noise(10, (40, 40)).save(folder / "tiny.png")
    captions["tiny"] = "mychar, tiny"
    noise(11, (900, 200)).save(folder / "wide.png")
    captions["wide"] = "mychar, panorama"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    noise(12).save(folder / "nocaption.png")
    noise(13).save(folder / "emptycaption.png")
    captions["emptycaption"] = "  \n"
    noise(14).save(folder / "untagged.png")
    captions["untagged"] = "a person, indoors"
    for stem, text in captions.items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


def test_every_kind_of_problem_is_found_and_names_its_file(troubled):
    report = doctor.check(troubled, "txt", resolution=256, batch_size=2)
    assert report.images == 13
    assert sorted((p.kind, p.file) for p in report.problems) == sorted([
        ("broken", "broken.png"),
        ("duplicate", "zcopy-of-good0.png"),
        ("near_duplicate", "zresaved-good1.jpg"),
        ("small", "tiny.png"),
        ("extreme_aspect", "wide.png"),
        ("missing_caption", "nocaption.png"),
        ("empty_caption", "emptycaption.png"),
        ("trigger_missing", "untagged.png"),
    ])
    assert report.trigger == "mychar"
    assert all(p.message.startswith(f"{p.file} {p.detail}: ") and p.file not in p.detail for p in report.problems)
    no_masks = [kind for kind in doctor.KINDS if kind not in ("mask_unusable", "empty_mask")]
    assert list(report.by_kind()) == no_masks  # one group each, in KINDS' order
    assert report.tag_frequency["mychar"] == 9
    assert report.suggested_steps == 650
    assert report.steps_reason == "13 images at batch size 2: 650 steps show each image about 100 times, as character and style LoRAs need"


def test_a_clean_folder_has_no_problems(sample_dataset):
    report = doctor.check(sample_dataset, "txt", resolution=64, batch_size=2, bucket_min_side=64,
                          bucket_max_side=128)
    assert report.images == 8 and report.problems == []


def test_the_trigger_phrase_of_phrase_mode_is_the_trigger(troubled):
    report = doctor.check(troubled, "phrase", caption_phrase="mychar", resolution=256)
    assert report.trigger == "mychar"
    assert not [p for p in report.problems if p.kind in ("missing_caption", "empty_caption", "trigger_missing")]


@pytest.mark.parametrize("images,batch,steps", [(3, 1, 400), (13, 2, 650), (100, 1, 4000)])
def test_suggested_steps_follow_the_image_count_and_batch(images, batch, steps):
    suggested, reason = doctor.suggest_steps(images, batch)
    assert suggested == steps and reason.startswith(f"{images} images at batch size {batch}: {steps} steps")
    assert f"each image about {round(steps * batch / images)} times" in reason


def test_a_folder_without_images_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="No images found"):
        doctor.check(tmp_path)
