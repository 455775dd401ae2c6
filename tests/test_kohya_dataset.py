"""kohya's dataset shapes: `N_name` sub-folders trained N times per epoch, a regularization folder drawn as often as
the training images and weighted by `prior_loss_weight`, caption and tag dropout and `keep_tokens_separator`, with
kohya's metadata; the doctor, the tab and the REST routes per sub-folder; every mistake refused with its reason;
masked loss in these folders."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain import dataset as ds
from lohatrain import doctor
from lohatrain.captions import save_caption, thumbnails
from lohatrain.demo import make_sample_dataset
from lohatrain.errors import DatasetError
from lohatrain.families import ldm_parts
from lohatrain.settings import TrainSettings
from lohatrain.trainer import train

from runs import lora_files, resume_run, settings_for, square_mask, stopping_at, write_dataset


pytestmark = pytest.mark.usefixtures("fixed_clock")


def concept(folder: Path, trigger: str | None, count: int, seed: int) -> Path:
    """`count` of the demo's pictures (of several shapes, so several buckets) in `folder`, their captions starting
    with `trigger`; with None, no caption files at all."""
    make_sample_dataset(folder, seed)
    for index, image in enumerate(sorted(folder.glob("*.png"))):
        caption = image.with_suffix(".txt")
        if index >= count:
            image.unlink()
            caption.unlink()
        elif trigger is None:
            caption.unlink()
        else:
            caption.write_text(f"{trigger}, {caption.read_text()}")
    return folder


@pytest.fixture
def two_concepts(tmp_path) -> Path:
    """kohya's layout: alice's pictures trained twice per epoch, bob's once."""
    root = tmp_path / "concepts"
    concept(root / "2_alice", "alice", 4, seed=1)
    concept(root / "1_bob", "bob", 4, seed=2)
    return root


def epoch_counts(items, batch_size: int, epochs: int, seed: int = 0) -> list[Counter]:
    """How often each image is drawn in each of the sampler's first `epochs` epochs (bucketed at 64 px)."""
    sampler = ds.BucketBatchSampler(ds.assign_buckets(items, 64, True, 64, 128), batch_size,
                                    torch.Generator().manual_seed(seed), ds.draws_per_epoch(items))
    return [Counter(i for _ in range(sampler.batches_per_epoch) for i in sampler.next_batch())
            for _ in range(epochs)]


# --- repeats ------------------------------------------------------------------------------------------------------


def test_images_of_2_a_are_drawn_exactly_twice_as_often_as_those_of_1_b_in_every_epoch(two_concepts):
    items = ds.scan_dataset(two_concepts, "txt")
    assert [(i.folder, i.repeats) for i in items] == [("1_bob", 1)] * 4 + [("2_alice", 2)] * 4
    assert all(i.caption.startswith(i.folder[2:]) for i in items)
    for batch_size in (1, 3):
        for counts in epoch_counts(items, batch_size, epochs=3):
            assert [counts[i] for i in range(len(items))] == [1] * 4 + [2] * 4


def test_an_image_without_a_caption_file_in_an_N_name_folder_is_captioned_by_the_folders_name(tmp_path):
    """kohya's class tokens: `10_sks dog` captions its uncaptioned images "sks dog"; a flat folder still needs
    its caption files."""
    concept(tmp_path / "data" / "3_sks dog", None, 2, seed=3)
    assert [(i.caption, i.repeats) for i in ds.scan_dataset(tmp_path / "data", "txt")] == [("sks dog", 3)] * 2
    with pytest.raises(DatasetError, match="caption file"):
        ds.scan_dataset(tmp_path / "data" / "3_sks dog", "txt")


def test_each_image_is_encoded_once_whatever_its_repeats(tiny_model, two_concepts, tmp_path):
    """Repeats draw the cached latents again; class images that no epoch draws are never encoded."""
    reg = tmp_path / "reg"
    concept(reg / "1_person", "person", 8, seed=4)  # 8 class images for the 4·2 + 4·1 = 12 training draws…
    assert ds.draws_per_epoch(ds.scan_dataset(two_concepts, "txt", reg_data_dir=reg))[8:] == [2] * 4 + [1] * 4
    concept(reg / "1_people", "people", 4, seed=5)  # …with 4 more before them, each is drawn once…
    concept(reg / "1_zz", "zz", 4, seed=6)  # …and these 4 never
    items = ds.scan_dataset(two_concepts, "txt", reg_data_dir=reg)
    assert [i.folder for i in items[8:]] == ["1_people"] * 4 + ["1_person"] * 8 + ["1_zz"] * 4
    assert ds.draws_per_epoch(items)[8:] == [1] * 12 + [0] * 4

    parts = ldm_parts(tiny_model)
    encoded = []
    encode_images = parts.encode_images
    parts = dataclasses.replace(parts, encode_images=lambda pixels: encoded.append(len(pixels)) or encode_images(pixels))
    train(parts, settings_for(two_concepts, tmp_path / "out", steps=12, reg_data_dir=str(reg)))  # one epoch: 24 draws
    assert sum(encoded) == 8 + 12  # the 8 training images and the 12 drawn class images, whatever their repeats


# --- regularization -------------------------------------------------------------------------------------------


def item(name: str, repeats: int = 1, regularization: bool = False) -> ds.ImageItem:
    return ds.ImageItem(Path(name), "", 64, 64, f"{repeats}_x", repeats, regularization)


def test_regularization_images_are_drawn_as_often_as_the_training_images_as_kohya():
    """kohya's rule (sd-scripts' DreamBoothDataset): in order, each class image its folder's repeats, then one more
    each in turn, until they have as many draws as the training images have with their repeats."""
    train_draws = [item("a", 3), item("b", 3)]  # 6 draws
    assert ds.draws_per_epoch(train_draws + [item(f"r{i}", regularization=True) for i in range(4)]) == \
        [3, 3, 2, 2, 1, 1]
    assert ds.draws_per_epoch(train_draws + [item(f"r{i}", 4, True) for i in range(3)]) == [3, 3, 4, 4, 0]
    assert ds.draws_per_epoch(train_draws + [item(f"r{i}", regularization=True) for i in range(9)]) == \
        [3, 3] + [1] * 6 + [0] * 3
    assert ds.draws_per_epoch(train_draws) == [3, 3]


def test_each_image_weighs_its_loss_weight():
    items = [item("a"), item("b", 2), item("r", regularization=True), item("s", 3, True)]
    assert ds.loss_weights(items, 0.25).tolist() == [1.0, 1.0, 0.25, 0.25]
    assert ds.loss_weights(items[:2], 0.25) is None  # no class images: the loss is left as it was


def test_with_prior_loss_weight_0_the_class_images_change_nothing_in_the_file(tiny_model, two_concepts, tmp_path):
    """The same class folder with other pictures and captions: with weight 0 the file's weights are the same bits,
    with weight 1 they differ (the class images are drawn and trained)."""
    concept(tmp_path / "people" / "1_person", "person", 4, seed=5)
    concept(tmp_path / "others" / "1_person", "man", 4, seed=6)
    files = {}
    for weight in (0.0, 1.0):
        for reg in ("people", "others"):
            settings = settings_for(two_concepts, tmp_path / f"{reg}-{weight}", reg_data_dir=str(tmp_path / reg),
                                    prior_loss_weight=weight, steps=2)
            files[reg, weight] = load_file(train(ldm_parts(copy.deepcopy(tiny_model)), settings).file)
    assert all(torch.equal(files["people", 0.0][k], files["others", 0.0][k]) for k in files["people", 0.0])
    assert not all(torch.equal(files["people", 1.0][k], files["others", 1.0][k]) for k in files["people", 1.0])


# --- captions -------------------------------------------------------------------------------------------------


def within_binomial(count: int, trials: int, rate: float) -> bool:
    """`count` successes of `trials` at `rate`, within 4.5 standard deviations (one in ~150,000 seeds fails)."""
    return abs(count - trials * rate) <= 4.5 * math.sqrt(trials * rate * (1 - rate))


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7])
def test_caption_dropout_empties_that_share_of_drawn_captions(rate):
    variation = ds.CaptionVariation(shuffle=True, dropout_rate=rate)
    rng = random.Random(11)
    drawn = [variation.apply("sks, red hair, smile", rng) for _ in range(4000)]
    assert within_binomial(drawn.count(""), 4000, rate)
    assert {tuple(sorted(c.split(", "))) for c in drawn if c} == {("red hair", "sks", "smile")}


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_tag_dropout_leaves_out_that_share_of_tags_but_never_the_kept_ones(rate):
    free = [f"tag{i}" for i in range(10)]
    variation = ds.CaptionVariation(keep_tokens=1, tag_dropout_rate=rate)
    rng = random.Random(12)
    drawn = [variation.apply(", ".join(["sks", *free]), rng).split(", ") for _ in range(2000)]
    assert all(tags[0] == "sks" for tags in drawn)
    assert all(tags[1:] == [t for t in free if t in tags] for tags in drawn)  # not shuffled: in their order
    assert within_binomial(sum(10 - (len(tags) - 1) for tags in drawn), 20000, rate)


def test_keep_tokens_separator_keeps_its_part_first_and_never_drops_it():
    """kohya's: the tags before the separator stay first, those after a second one stay last, however the rest is
    shuffled and dropped; the separator itself is never trained; a caption without it keeps `keep_tokens`."""
    caption = "sks, woman ||| red hair, smile, hat, outdoors ||| masterpiece"
    variation = ds.CaptionVariation(shuffle=True, keep_tokens=3, separator="|||", tag_dropout_rate=0.5)
    rng = random.Random(13)
    drawn = [variation.apply(caption, rng).split(", ") for _ in range(500)]
    assert all(tags[:2] == ["sks", "woman"] and tags[-1] == "masterpiece" for tags in drawn)
    assert all(set(tags[2:-1]) <= {"red hair", "smile", "hat", "outdoors"} for tags in drawn)
    assert len({tuple(tags) for tags in drawn}) > 20  # the middle is shuffled and thinned
    assert ds.CaptionVariation(separator="|||").apply(caption, rng) == \
        "sks, woman, red hair, smile, hat, outdoors, masterpiece"
    no_separator = [variation.apply("sks, woman, red hair, smile", rng).split(", ") for _ in range(50)]
    assert all(tags[:3] == ["sks", "woman", "red hair"] for tags in no_separator)


def test_options_left_off_draw_nothing():
    """Without dropout, a separator or shuffling the caption stream is not touched, so a run that leaves them
    alone draws what it drew before they existed."""
    rng = random.Random(14)
    state = rng.getstate()
    for variation in (ds.CaptionVariation(), ds.CaptionVariation(separator="|||"),
                      ds.CaptionVariation(keep_tokens=2)):
        assert variation.apply("sks,  red hair,smile", rng) == "sks,  red hair,smile"
    assert rng.getstate() == state


def test_the_text_encoder_gets_the_dropped_and_kept_captions(tiny_model, tmp_path):
    """Through a run: every caption encoded starts with the kept part and ends with the kept end, has no
    separator, and some are empty (caption dropout)."""
    folder = concept(tmp_path / "data" / "1_sks", None, 4, seed=7)
    for index, caption in enumerate(sorted(folder.glob("*.png"))):
        caption.with_suffix(".txt").write_text(f"sks, woman ||| tag{index}, red hair, smile ||| masterpiece")
    parts = ldm_parts(tiny_model)
    encoded = []

    def recording(clip_skip):
        encode = parts.prompt_encoder(clip_skip)
        return lambda captions: encoded.extend(captions) or encode(captions)

    settings = settings_for(tmp_path / "data", tmp_path / "out", steps=8, shuffle_tags=True,
                            keep_tokens_separator="|||", caption_dropout_rate=0.3, caption_tag_dropout_rate=0.3)
    train(dataclasses.replace(parts, prompt_encoder=recording), settings)
    assert len(encoded) == 16 and "" in encoded
    assert all(c.startswith("sks, woman, ") and c.endswith(", masterpiece") and "|" not in c for c in encoded if c)


# --- metadata and resume ------------------------------------------------------------------------------------------


KOHYA = dict(shuffle_tags=True, keep_tokens_separator="|||", caption_dropout_rate=0.2, caption_tag_dropout_rate=0.25,
             prior_loss_weight=0.5, flip_aug=True)


def test_a_resumed_run_with_dropout_and_class_images_ends_in_the_same_bytes(tiny_model, two_concepts, tmp_path):
    concept(tmp_path / "reg" / "1_person", "person", 3, seed=8)
    kw = dict(steps=5, save_every_steps=2, reg_data_dir=str(tmp_path / "reg"), **KOHYA)
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(two_concepts, tmp_path / "whole", **kw))
    for stop in (1, 3):
        out = tmp_path / f"stopped-{stop}"
        first = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(two_concepts, out, **kw), stopping_at(stop))
        assert first.status == "interrupted" and first.steps_done == stop
        assert resume_run(copy.deepcopy(tiny_model), out).steps_done == 5
        assert lora_files(out) == lora_files(tmp_path / "whole"), stop

    with safe_open(tmp_path / "whole" / "test-loha.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_bob": {"n_repeats": 1, "img_count": 4},
                                                   "2_alice": {"n_repeats": 2, "img_count": 4}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 3}}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("12", "3")  # with repeats, as kohya
    assert set(json.loads(meta["ss_tag_frequency"])) == {"1_bob", "2_alice", "1_person"}
    assert json.loads(meta["ss_tag_frequency"])["2_alice"]["alice"] == 4
    buckets = json.loads(meta["ss_bucket_info"])["buckets"].values()
    assert sum(b["count"] for b in buckets) == 12 + 12  # an epoch's draws: the class images as many as the rest
    assert meta["ss_num_batches_per_epoch"] == str(sum(math.ceil(b["count"] / 2) for b in buckets))
    assert (meta["ss_prior_loss_weight"], meta["ss_caption_dropout_rate"], meta["ss_caption_tag_dropout_rate"],
            meta["ss_keep_tokens_separator"]) == ("0.5", "0.2", "0.25", "|||")
    shared = json.loads(meta["lohatrain_settings"])
    assert shared["reg_data_dir"] == "reg" and shared["dataset_dir"] == "concepts"  # no local paths in a shared file
    assert str(tmp_path) not in meta["lohatrain_settings"]


def test_a_flat_folder_run_has_todays_metadata(tiny_model, sample_dataset, tmp_path):
    """Nothing of the above in a run that uses none of it: the keys are written only when used."""
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, steps=1))
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"dataset": {"n_repeats": 1, "img_count": 8}}
    assert meta["ss_num_train_images"] == "8"
    assert not {"ss_reg_dataset_dirs", "ss_num_reg_images", "ss_prior_loss_weight", "ss_caption_dropout_rate",
                "ss_caption_tag_dropout_rate", "ss_keep_tokens_separator"} & set(meta)
    assert not {"reg_data_dir", "prior_loss_weight", "caption_dropout_rate", "caption_tag_dropout_rate",
                "keep_tokens_separator"} & set(json.loads(meta["lohatrain_settings"]))


# --- mistakes -------------------------------------------------------------------------------------------------


def _layouts(root: Path) -> dict[str, tuple[Path, str, str]]:
    """Datasets a user gets wrong: (dataset folder, regularization folder, what the refusal says)."""
    good = concept(root / "good" / "2_alice", "alice", 2, seed=9).parent
    concept(root / "zero" / "0_alice", "alice", 2, seed=9)
    concept(root / "word" / "two_alice", "alice", 2, seed=9)
    concept(root / "empty-concept" / "2_alice", "alice", 2, seed=9)
    (root / "empty-concept" / "3_bob").mkdir()
    concept(root / "mixed", "alice", 2, seed=9)
    concept(root / "mixed" / "2_bob", "bob", 2, seed=9)
    (root / "no-class-images").mkdir()
    return {
        "zero repeats": (root / "zero", "", "0_alice has 0 repeats"),
        "not a number": (root / "word", "", "two_alice is not named N_name"),
        "an empty sub-folder": (root / "empty-concept", "", "3_bob holds no images"),
        "loose images beside sub-folders": (root / "mixed", "", "2_bob holds images too"),
        "an empty regularization folder": (good, root / "no-class-images", "No images found in the regularization "
                                                                           "folder"),
        "the dataset as regularization folder": (good, good, "is the dataset folder"),
        "a regularization folder inside the dataset": (good, good / "2_alice", "inside the dataset folder"),
        "a regularization folder holding the dataset": (good, root, "inside the regularization folder"),
    }


def test_every_folder_mistake_is_refused_with_its_reason(tmp_path):
    for what, (folder, reg, message) in _layouts(tmp_path).items():
        with pytest.raises(DatasetError, match=message):
            ds.scan_dataset(folder, "txt", reg_data_dir=reg)
        with pytest.raises(DatasetError, match=message):
            doctor.check(folder, "txt", reg_data_dir=reg)


@pytest.mark.parametrize("setting, value, message", [
    ("caption_dropout_rate", 1.5, "caption_dropout_rate must be at least 0 and at most 1, not 1.5"),
    ("caption_tag_dropout_rate", -0.1, "caption_tag_dropout_rate must be at least 0 and at most 1, not -0.1"),
    ("prior_loss_weight", -1, "prior_loss_weight must be at least 0"),
    ("keep_tokens_separator", ",", "keep_tokens_separator must be a mark that is not in your tags"),
    ("keep_tokens_separator", "  ", "keep_tokens_separator must be a mark that is not in your tags"),
])
def test_a_bad_rate_or_separator_is_refused(setting, value, message):
    assert TrainSettings(dataset_dir="images").problems() == []
    problems = TrainSettings(dataset_dir="images", **{setting: value}).problems()
    assert len(problems) == 1 and message in problems[0]


def test_rest_refuses_each_mistake_with_422(webui_server, tmp_path):
    from page import run_body

    url = f"{webui_server.url}/lohatrain/v1/train"
    for what, (folder, reg, message) in _layouts(tmp_path).items():
        r = httpx.post(url, json=run_body(webui_server, "kohya-mistake", dataset_dir=str(folder),
                                          reg_data_dir=str(reg)))
        assert r.status_code == 422 and message in r.json()["detail"][0], what
    r = httpx.post(url, json=run_body(webui_server, "kohya-mistake", caption_dropout_rate=-0.5,
                                      caption_tag_dropout_rate=2, prior_loss_weight=-1))
    assert r.status_code == 422
    assert [p.split()[0] for p in r.json()["detail"]] == ["prior_loss_weight", "caption_dropout_rate",
                                                          "caption_tag_dropout_rate"]
    assert not (webui_server.lora_dir / "kohya-mistake.safetensors").exists()


# --- the doctor, the tab and the REST check -------------------------------------------------------------------


@pytest.fixture
def checked(tmp_path):
    """alice's pictures twice per epoch (one caption lacks her trigger), bob's once and captioned by his folder's
    name, and a regularization folder of class images without captions."""
    root = tmp_path / "concepts"
    concept(root / "2_alice", "alice", 3, seed=1)
    (root / "2_alice" / "sample_02.txt").write_text("a person, outdoors")
    concept(root / "1_bob", None, 2, seed=2)
    concept(tmp_path / "reg" / "1_person", None, 4, seed=3)
    return root, tmp_path / "reg"


def expected_folders(root: Path) -> list[dict]:
    # draws per epoch: bob 2·1, alice 3·2, the 4 class images once each and once more to match those 8
    return [dict(name="1_bob", regularization=False, repeats=1, images=2, draws=2, share=2 / 16, trigger="bob"),
            dict(name="2_alice", regularization=False, repeats=2, images=3, draws=6, share=6 / 16, trigger="alice"),
            dict(name="1_person", regularization=True, repeats=1, images=4, draws=8, share=8 / 16, trigger="")]


def test_the_doctor_reports_each_sub_folder(checked):
    root, reg = checked
    report = doctor.check(root, "txt", resolution=64, batch_size=2, bucket_min_side=64, bucket_max_side=128,
                          reg_data_dir=reg)
    assert [dataclasses.asdict(f) for f in report.folders] == expected_folders(root)
    assert (report.images, report.regularization_images) == (5, 4)
    assert [(p.kind, p.file) for p in report.problems] == [("trigger_missing", "2_alice/sample_02.png")]
    # 5 images 100 times on average are 500 draws; with as many class-image draws, 1000 draws at 2 a step
    assert report.suggested_steps == 500
    assert all(s in report.steps_reason for s in ("1_bob ×1", "2_alice ×2", "8 regularization draws"))
    assert report.tag_frequency["bob"] == 2 and "person" not in report.tag_frequency


def test_the_rest_check_and_the_tab_report_each_sub_folder(webui_server, checked):
    from lohatrain.webui import ui

    root, reg = checked
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/dataset/check", json={
        "dataset_dir": str(root), "caption_mode": "txt", "resolution": 64, "batch_size": 2, "reg_data_dir": str(reg)})
    assert r.status_code == 200 and r.json()["folders"] == expected_folders(root)
    assert r.json()["problems"][0]["file"] == "2_alice/sample_02.png"
    report, shown, names, found = ui.check_dataset(str(root), ui.CAPTION_LABELS["txt"], "", ".txt", 64, True, 64, 128,
                                                   2, str(reg))
    assert "<b>5</b> images, <b>5</b> with a caption, and <b>4</b> regularization images" in report
    assert "<td>2_alice</td><td>2</td><td>3</td><td>6</td><td>38%</td><td>alice</td>" in report
    assert "<td>1_person (regularization)</td><td>1</td><td>4</td><td>8</td><td>50%</td>" in report
    assert "draws per epoch" in report
    shown_steps = ui.suggestion(found, ui.METHOD_LABELS["loha"], 2)[0]["value"]  # what Apply puts in the form
    assert "500 steps" in shown_steps and "each image, on average, about 100 times" in shown_steps
    assert ui.apply_suggestion(found, ui.METHOD_LABELS["loha"], 2)[0] == 500
    assert ui.apply_suggestion(found, ui.METHOD_LABELS["loha"], 2, "prodigy") == [500, 1.0]  # the optimizer's rate
    assert names == ["1_bob/sample_00.png", "1_bob/sample_01.png", "2_alice/sample_00.png", "2_alice/sample_01.png",
                     "2_alice/sample_02.png"] and len(shown) == 5


def test_a_thumbnails_caption_in_a_sub_folder_is_edited_there(checked):
    root, _ = checked
    written = save_caption(root, "1_bob/sample_01.png", "bob, hat", ".txt")
    assert written == root / "1_bob" / "sample_01.txt" and written.read_text() == "bob, hat"
    assert dict(thumbnails(root, ".txt"))[str(root / "1_bob" / "sample_01.png")] == "bob, hat"
    assert ds.scan_dataset(root, "txt")[1].caption == "bob, hat"


# --- masked loss in kohya's folders -------------------------------------------------------------------------------


def test_masked_images_in_N_name_and_regularization_folders_train_with_their_masks_on_every_draw(tiny_model,
                                                                                                  tmp_path):
    """An image of `2_alice` and a class image, each under an all-black mask file, are drawn as their folders say
    (alice's twice an epoch), yet with masked loss their pixels change nothing in the file: every draw is masked,
    with the class images' loss weight on top. Without masked loss they do. A class image's alpha is its mask."""
    black, files = Image.new("L", (64, 64), 0), {}
    for pixels in (0, 1):  # the two black-masked images with other pixels entirely
        root = tmp_path / str(pixels)
        write_dataset(root / "data" / "2_alice", {0: black}, count=2, pixels_seed=pixels)
        write_dataset(root / "data" / "1_bob", {1: square_mask(8, 40)}, count=2)
        reg = write_dataset(root / "reg" / "1_person", {0: black}, count=2, pixels_seed=pixels)
        with Image.open(reg / "img_1.png") as img:
            transparent = img.convert("RGBA")
        transparent.putalpha(square_mask(16, 48))
        transparent.save(reg / "img_1.png")
        for masked_loss in (False, True):
            settings = settings_for(root / "data", tmp_path / f"out-{pixels}-{masked_loss}", masked_loss=masked_loss,
                                    reg_data_dir=str(root / "reg"), prior_loss_weight=0.5)
            files[pixels, masked_loss] = train(ldm_parts(copy.deepcopy(tiny_model)), settings).file.read_bytes()
    assert files[0, True] == files[1, True]  # whole file, byte for byte
    assert files[0, False] != files[1, False]

    items = ds.scan_dataset(tmp_path / "0" / "data", "txt", reg_data_dir=tmp_path / "0" / "reg", masked_loss=True)
    assert [(i.label, i.mask and i.mask.name) for i in items] == [
        ("1_bob/img_0.png", None), ("1_bob/img_1.png", "img_1.mask.png"), ("2_alice/img_0.png", "img_0.mask.png"),
        ("2_alice/img_1.png", None), ("regularization/1_person/img_0.png", "img_0.mask.png"),
        ("regularization/1_person/img_1.png", "img_1.png")]
    assert ds.draws_per_epoch(items) == [1, 1, 2, 2, 3, 3]  # 12 draws: the 6 steps of 2 are one whole epoch


def test_the_doctor_counts_masks_in_sub_folders_and_names_each_by_its_folder(webui_server, tmp_path):
    """Masks are checked in `N_name` and regularization folders alike and named there (`2_alice/img_1.mask.png`);
    the dataset check over REST takes `reg_data_dir` and `masked_loss` together. Only class images with masks do
    not make a masked run: the dataset's own images need some."""
    data, reg = tmp_path / "data", tmp_path / "reg"
    write_dataset(data / "2_alice", {0: Image.new("L", (64, 64), 0), 1: square_mask(0, 16, size=32)}, count=3)
    write_dataset(data / "1_bob", {0: square_mask(8, 40)}, count=1)
    write_dataset(reg / "1_person", {1: Image.new("L", (64, 64), 0), 0: square_mask(0, 16, size=48)}, count=2)
    with pytest.raises(DatasetError) as refused:
        ds.scan_dataset(data, "txt", reg_data_dir=reg, masked_loss=True)
    assert "2_alice/img_1.mask.png is 32x32 but 2_alice/img_1.png is 64x64" in str(refused.value)
    (data / "2_alice" / f"img_1{ds.MASK_SUFFIX}").unlink()
    with pytest.raises(DatasetError, match="regularization/1_person/img_0.mask.png is 48x48 but "
                                           "regularization/1_person/img_0.png is 64x64"):
        ds.scan_dataset(data, "txt", reg_data_dir=reg, masked_loss=True)

    r = httpx.post(f"{webui_server.url}/lohatrain/v1/dataset/check", json={
        "dataset_dir": str(data), "reg_data_dir": str(reg), "masked_loss": True, "resolution": 64})
    assert r.status_code == 200
    report = r.json()
    assert (report["images"], report["regularization_images"], report["masks"]) == (4, 2, 4)
    assert [f["name"] for f in report["folders"]] == ["1_bob", "2_alice", "1_person"]
    assert [(p["file"], p["kind"]) for p in report["problems"] if "mask" in p["kind"]] == [
        ("2_alice/img_0.png", "empty_mask"), ("regularization/1_person/img_0.png", "mask_unusable"),
        ("regularization/1_person/img_1.png", "empty_mask")]

    plain = write_dataset(tmp_path / "plain" / "1_carol", count=2).parent
    with pytest.raises(DatasetError, match="masked_loss is on but no image has a mask"):
        ds.scan_dataset(plain, "txt", reg_data_dir=reg, masked_loss=True)
