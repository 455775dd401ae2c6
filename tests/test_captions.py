"""Captioning a dataset with the WebUI's own taggers (DeepBooru, the interrogator) through the host stand-in,
and editing one caption by hand."""

import sys
from pathlib import Path

import pytest
from PIL import Image

import lohatrain.ldm_importable  # noqa: F401  (before anything that imports ldm)
from lohatrain.captions import CaptionOptions, caption_folder, save_caption, thumbnails
from lohatrain.errors import LohatrainError

STUB = str(Path(__file__).resolve().parent / "webui_stub")
if STUB not in sys.path:
    sys.path.insert(0, STUB)

from modules import call_queue, shared  # noqa: E402

from lohatrain.webui import actions  # noqa: E402

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@pytest.fixture
def folder(tmp_path):
    """Three one-colour images, one that does not open, and a caption already written for "blue"."""
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 32), rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "blue.txt").write_text("my own words, sky", encoding="utf-8")
    return tmp_path


def captions_in(folder: Path) -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def deepbooru(folder, options=CaptionOptions(), **tag_options):
    return list(actions.caption_images(str(folder), "deepbooru", options, tag_options, via="tab"))


def test_deepbooru_captions_new_images_and_keeps_written_ones(folder):
    steps = deepbooru(folder, CaptionOptions(prefix="mychar", drop_tags="solo"))
    assert {s.file: s.outcome for s in steps} == {"blue.png": "kept", "broken.png": "broken", "green.png": "written",
                                                 "red.png": "written"}
    written = captions_in(folder)
    assert written["blue"] == "my own words, sky"
    # the host's options: spaces for underscores, escaped brackets, alphabetical; the prefix first, "solo" dropped
    assert written["red"] == "mychar, dark \\(theme\\), red \\(color\\)"
    assert written["green"].startswith("mychar, ") and "green background" in written["green"]
    assert "solo" not in written["green"] and "rating" not in written["green"]
    assert not call_queue.queue_lock.locked() and shared.state.job == ""


def test_the_tabs_tag_options_apply_to_one_pass_only(folder):
    deepbooru(folder, CaptionOptions(existing="overwrite"), deepbooru_use_spaces=False, deepbooru_escape=False,
              interrogate_deepbooru_score_threshold=0.6)
    assert captions_in(folder)["red"] == "red_(color), solo"  # "dark (theme)" scores 0.5, under 0.6
    assert shared.opts.deepbooru_use_spaces and shared.opts.interrogate_deepbooru_score_threshold == 0.5


def test_append_adds_only_new_tags_and_overwrite_replaces(folder):
    deepbooru(folder, CaptionOptions(prefix="my own words", existing="append"))
    assert captions_in(folder)["blue"] == "my own words, sky, blue sky, dark \\(theme\\), solo"
    deepbooru(folder, CaptionOptions(existing="overwrite"))
    assert captions_in(folder)["blue"] == "blue sky, dark \\(theme\\), solo"


def test_interrogator_writes_its_sentence_and_ends_its_host_job(folder):
    steps = list(actions.caption_images(str(folder), "interrogator", CaptionOptions(existing="overwrite"), {},
                                     via="tab"))
    assert [s.outcome for s in steps].count("written") == 3
    assert captions_in(folder)["green"] == "a picture with a lot of green"
    assert shared.state.job == "" and not call_queue.queue_lock.locked()


def test_interrupt_stops_within_one_image(folder):
    pass_ = actions.caption_images(str(folder), "deepbooru", CaptionOptions(existing="overwrite"), {}, via="tab")
    first = next(pass_)
    assert actions.interrupt_task()
    assert list(pass_) == []
    assert first.file == "blue.png" and captions_in(folder)["blue"] != "my own words, sky"
    assert set(captions_in(folder)) == {"blue"}
    shared.state.interrupted = False
    assert not actions.interrupt_task()  # nothing runs any more


def test_a_wrong_caption_extension_or_folder_is_refused_before_anything_is_written(folder, tmp_path):
    with pytest.raises(LohatrainError, match="extension"):
        deepbooru(folder, CaptionOptions(ext="../x"))
    with pytest.raises(LohatrainError, match="does not exist"):
        deepbooru(tmp_path / "nowhere")
    assert captions_in(folder) == {"blue": "my own words, sky"}


def test_editing_a_thumbnails_caption_writes_its_file(folder):
    save_caption(folder, "red.png", "mychar,\n red dress  ", ".txt")
    assert captions_in(folder)["red"] == "mychar, red dress"
    assert dict((Path(p).name, c) for p, c in thumbnails(folder, ".txt"))["red.png"] == "mychar, red dress"
    with pytest.raises(LohatrainError, match="not an image"):
        save_caption(folder, "../red.png", "x", ".txt")


def test_a_caption_file_with_another_case_is_the_one_rewritten(tmp_path):
    Image.new("RGB", (16, 16), COLOURS["red"]).save(tmp_path / "photo.png")
    (tmp_path / "photo.TXT").write_text("old", encoding="utf-8")
    steps = list(caption_folder(tmp_path, lambda image: "red", CaptionOptions(existing="overwrite")))
    assert [s.caption for s in steps] == ["red"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.TXT", "photo.png"]
