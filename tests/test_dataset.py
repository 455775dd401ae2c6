"""The dataset folder as users fill it: real image files of every supported kind, captions, broken files."""
import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lohatrain import dataset as ds
from lohatrain.dataset import (
    IMAGE_EXTENSIONS,
    BucketBatchSampler,
    CaptionVariation,
    ImageItem,
    assign_bucket,
    assign_buckets,
    bucket_table,
    color_augment,
    flip,
    load_image,
    make_buckets,
    prepare_image,
    scan_dataset,
    tag_frequency,
    upscale_warnings,
)
from lohatrain.errors import DatasetError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _close(actual, expected, tolerance=6):
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def _save(path, size=(48, 32), color=(200, 100, 50), **save_args):
    Image.new("RGB", size, color).save(path, **save_args)
    return path


# --- load_image: every kind of file a user may drop in the folder -------------------------------------------


@pytest.mark.parametrize("name, save_args", [
    ("a.png", {}), ("a.jpg", {"quality": 95}), ("a.jpeg", {"quality": 95}),
    ("a.webp", {"lossless": True}), ("a.bmp", {}),
])
def test_supported_formats_load_as_rgb_with_their_colours(tmp_path, name, save_args):
    img = load_image(_save(tmp_path / name, **save_args))
    assert img.mode == "RGB" and img.size == (48, 32)
    assert _close(img.getpixel((10, 10)), (200, 100, 50))


def test_jpeg_exif_orientation_is_applied(tmp_path):
    # Stored landscape, red left half; orientation 6 means "rotate 90° clockwise to display", so it is portrait
    # with red on top, which is what the user saw in their photo viewer.
    stored = Image.new("RGB", (40, 20), RED)
    stored.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)

    img = load_image(tmp_path / "phone.jpg")
    assert img.size == (20, 40)
    assert _close(img.getpixel((10, 5)), RED, 10) and _close(img.getpixel((10, 35)), BLUE, 10)
    assert [(i.width, i.height) for i in scan_dataset(tmp_path, "none")] == [(20, 40)]


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black, as editors often store it
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    rgba.save(tmp_path / "cutout.png")

    img = load_image(tmp_path / "cutout.png")
    assert img.getpixel((5, 5)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == RED
    assert _close(img.getpixel((1, 0)), (127, 127, 127), 2)  # half-transparent black blends to grey


def test_greyscale_with_transparent_level_becomes_white(tmp_path):
    grey = Image.new("L", (4, 4), 100)
    grey.putpixel((0, 0), 30)
    grey.save(tmp_path / "grey.png", transparency=100)
    img = load_image(tmp_path / "grey.png")
    assert img.getpixel((2, 2)) == (255, 255, 255) and img.getpixel((0, 0)) == (30, 30, 30)


def test_palette_png_with_and_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 0, 255, 0, 0, 0] + [0] * (256 * 3 - 9)
    indexed = Image.new("P", (4, 4), 0)
    indexed.putpalette(palette)
    indexed.putpixel((1, 1), 1)
    indexed.putpixel((2, 2), 2)
    indexed.save(tmp_path / "opaque.png")
    indexed.save(tmp_path / "transparent.png", transparency=2)

    opaque = load_image(tmp_path / "opaque.png")
    assert (opaque.getpixel((0, 0)), opaque.getpixel((1, 1)), opaque.getpixel((2, 2))) == (RED, BLUE, (0, 0, 0))
    transparent = load_image(tmp_path / "transparent.png")
    assert transparent.getpixel((2, 2)) == (255, 255, 255)
    assert transparent.getpixel((1, 1)) == BLUE


def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path):
    levels = np.array([[0, 32896, 65535]], dtype=np.uint16)  # black, mid-grey, white
    Image.fromarray(levels).save(tmp_path / "scan16.png")
    assert Image.open(tmp_path / "scan16.png").mode in ("I;16", "I")  # Pillow 9 opens it as "I"; convert("RGB") clips both

    img = load_image(tmp_path / "scan16.png")
    assert [img.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_cmyk_jpeg_keeps_its_colour(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=95)  # pure red ink
    img = load_image(tmp_path / "print.jpg")
    assert img.mode == "RGB" and _close(img.getpixel((8, 8)), RED, 10)


def test_unreadable_file_raises_dataset_error_naming_it(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture")
    with pytest.raises(DatasetError, match="notes.png"):
        load_image(tmp_path / "notes.png")


# --- scan_dataset ---------------------------------------------------------------------------------------------


def test_scan_finds_top_level_images_sorted_and_ignores_everything_else(tmp_path):
    for name in ("b.jpg", "a.png", "c.WEBP"):
        _save(tmp_path / name)
    _save(tmp_path / "d.gif")  # unsupported type
    _save(tmp_path / "._a.png")  # macOS metadata file next to a copied image; not a real image
    (tmp_path / "readme.md").write_text("hi")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "nested.png")

    items = scan_dataset(tmp_path, "none")
    assert [i.path.name for i in items] == ["a.png", "b.jpg", "c.WEBP"]
    assert all(i.caption == "" and (i.width, i.height) == (48, 32) for i in items)
    assert items[0].path == tmp_path / "a.png"


def test_phrase_mode_gives_every_image_the_phrase(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    assert [i.caption for i in scan_dataset(tmp_path, "phrase", "  sks  dog ")] == ["sks dog", "sks dog"]


def test_phrase_mode_with_empty_phrase_is_refused(tmp_path):
    _save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="phrase is empty"):
        scan_dataset(tmp_path, "phrase", "   ")


def test_txt_mode_reads_captions_beside_images(tmp_path):
    for stem in ("a", "b", "c", "d"):
        _save(tmp_path / f"{stem}.png")
    (tmp_path / "a.txt").write_bytes("\ufeff1girl, smile\n".encode("utf-8"))  # BOM from Windows Notepad
    (tmp_path / "b.txt").write_text("blue  sky,\r\n  café\n\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("", encoding="utf-8")  # deliberately empty caption
    (tmp_path / "d.TXT").write_text("upper case extension", encoding="utf-8")

    captions = {i.path.name: i.caption for i in scan_dataset(tmp_path, "txt")}
    assert captions == {"a.png": "1girl, smile", "b.png": "blue sky, café", "c.png": "",
                        "d.png": "upper case extension"}


def test_txt_mode_with_custom_caption_extension(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("wrong file")
    (tmp_path / "a.caption").write_text("right file")
    assert scan_dataset(tmp_path, "txt", caption_ext=".caption")[0].caption == "right file"


def test_every_missing_caption_is_named_in_one_error(tmp_path):
    for stem in ("a", "b", "c", "d"):
        _save(tmp_path / f"{stem}.png")
    (tmp_path / "b.txt").write_text("tagged")

    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, "txt")
    message = str(err.value)
    assert "3 caption file(s) are missing" in message
    assert all(name in message for name in ("a.txt", "c.txt", "d.txt"))
    assert "b.txt" not in message


def test_many_missing_captions_are_summarised(tmp_path):
    for i in range(13):
        _save(tmp_path / f"img{i:02d}.png", size=(4, 4))
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, "txt")
    message = str(err.value)
    assert "img09.txt" in message and "img10.txt" not in message
    assert "and 3 more" in message


def test_caption_file_in_another_encoding_is_reported(tmp_path):
    _save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café".encode("cp1252"))
    with pytest.raises(DatasetError, match=r"not UTF-8 text: a\.txt"):
        scan_dataset(tmp_path, "txt")


def test_broken_images_are_all_named_in_one_error(tmp_path):
    _save(tmp_path / "good.png")
    full = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])  # interrupted download: the header is fine
    (tmp_path / "text.png").write_text("not an image at all")

    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, "none")
    message = str(err.value)
    assert "2 image(s) cannot be read" in message
    assert "cut.png" in message and "text.png" in message and "good.png" not in message


def test_missing_captions_and_broken_images_are_reported_together(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    _save(tmp_path / "good.png")
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, "txt")
    missing_line, broken_line = str(err.value).splitlines()[1:]
    assert "good.txt" in missing_line and "text.txt" in missing_line
    assert "cannot be read" in broken_line and "text.png" in broken_line and "good.png" not in broken_line


def test_empty_folder_says_which_files_are_supported(tmp_path):
    (tmp_path / "photo.gif").write_bytes(b"GIF89a")
    with pytest.raises(DatasetError) as err:
        scan_dataset(tmp_path, "none")
    assert "No images found" in str(err.value)
    assert all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize("make_folder, expected", [
    (lambda tmp: tmp / "nope", "does not exist"),
    (lambda tmp: _save(tmp / "a.png"), "not a folder"),
    (lambda tmp: "  ", "No dataset folder"),
])
def test_unusable_folder_is_explained(tmp_path, make_folder, expected):
    with pytest.raises(DatasetError, match=expected):
        scan_dataset(make_folder(tmp_path), "none")


# --- captions -------------------------------------------------------------------------------------------------


TAGS = "sks, 1girl, red hair, smile, outdoors, sky, tree, hat, dress, looking at viewer"


def shuffle_caption(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    return CaptionVariation(shuffle=True, keep_tokens=keep_tokens).apply(caption, rng)


def test_shuffle_keeps_first_tokens_and_the_same_tags():
    for seed in range(20):
        out = shuffle_caption(TAGS, random.Random(seed), keep_tokens=2).split(", ")
        assert out[:2] == ["sks", "1girl"]
        assert sorted(out) == sorted(TAGS.split(", "))


def test_shuffle_is_repeatable_per_seed_and_actually_shuffles():
    assert shuffle_caption(TAGS, random.Random(7)) == shuffle_caption(TAGS, random.Random(7))
    results = [shuffle_caption(TAGS, random.Random(seed)) for seed in range(10)]
    assert TAGS not in results and len(set(results)) == 10


def test_shuffle_cleans_tags():
    assert shuffle_caption(" a ,, b , ", random.Random(0), keep_tokens=5) == "a, b"
    assert shuffle_caption("", random.Random(0)) == ""


def test_tag_frequency_counts_tags_over_all_captions():
    items = [ImageItem(Path("x.png"), caption, 1, 1) for caption in ("sks, Smile, hat", "sks, smile", "", "sks")]
    assert tag_frequency(items) == {"sks": 3, "smile": 2, "hat": 1}
    assert list(tag_frequency(items)) == ["sks", "smile", "hat"]  # most frequent first


# --- buckets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [512, 640, 768, 1024])
def test_buckets_fit_the_resolution(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 256 <= w <= 1024 and 256 <= h <= 1024
        assert w * h <= resolution ** 2
        assert (h, w) in buckets  # portrait and landscape are treated alike


def test_buckets_use_the_largest_shape_for_each_side():
    # Per width the tallest height that fits, and the same turned 90° so portraits get as many shapes as landscapes.
    buckets = make_buckets(512)
    assert {w for w, _ in buckets} == set(range(256, 1025, 64))
    for w, h in buckets:
        assert (h + 64) * w > 512 ** 2 or h == 1024 or (w + 64) * h > 512 ** 2 or w == 1024
    assert {(320, 768), (768, 320), (320, 704), (704, 320), (256, 1024), (1024, 256)} <= set(buckets)
    assert (320, 640) not in buckets  # not the largest height for 320 wide, nor the largest width for 640 high


def test_images_land_in_the_bucket_of_their_shape():
    buckets = make_buckets(512)
    w, h = assign_bucket(2000, 1000, buckets)
    assert w > h and abs(w / h - 2) < 0.25
    assert assign_bucket(1000, 2000, buckets) == (h, w)
    assert assign_bucket(777, 777, buckets) == (512, 512)
    assert assign_bucket(10000, 100, buckets) == (1024, 256)  # extreme shapes take the most extreme bucket


def test_equally_good_buckets_prefer_the_larger_one():
    # Less upscaling: a bigger bucket of the same shape keeps more of the image's detail.
    assert assign_bucket(300, 300, [(256, 256), (512, 512), (384, 384)]) == (512, 512)


def test_portrait_and_landscape_versions_of_a_shape_get_turned_buckets():
    buckets = make_buckets(512)
    for w in range(300, 3000, 37):
        bw, bh = assign_bucket(w, 1000, buckets)
        assert assign_bucket(1000, w, buckets) == (bh, bw), w


def test_bucketing_off_puts_every_image_in_the_square():
    items = [ImageItem(Path("x.png"), "", 2000, 1000), ImageItem(Path("x.png"), "", 300, 900)]
    assert assign_buckets(items, 640, bucketing=False) == [(640, 640), (640, 640)]
    on = assign_buckets(items, 640, bucketing=True)
    assert on[0][0] > on[0][1] and on[1][0] < on[1][1]


def test_the_check_says_when_grouping_has_no_effect_and_why():
    wide, square = ImageItem(Path("w.png"), "", 320, 192), ImageItem(Path("s.png"), "", 300, 300)
    note = ds.grouping_note([wide, square], assign_buckets([wide, square], 256, True, 128, 512), 256, True, 128, 512)
    assert note is None  # at 256 px the 320×192 image gets a wide bucket of its own
    only = assign_buckets([wide, square], 256, True, 256, 256)
    assert "the only bucket is 256×256" in ds.grouping_note([wide, square], only, 256, True, 256, 256)
    squares = [square, ImageItem(Path("t.png"), "", 500, 490)]
    note = ds.grouping_note(squares, assign_buckets(squares, 256, True, 128, 512), 256, True, 128, 512)
    assert "every image is closest to the 256×256 bucket" in note


def test_bucket_table_counts_images_per_bucket():
    items = [ImageItem(Path("x.png"), "", 1, 1)] * 4
    buckets = [(512, 512), (768, 320), (512, 512), (320, 768)]
    assert bucket_table(items, buckets) == [((320, 768), 1), ((512, 512), 2), ((768, 320), 1)]


# --- image tensors ------------------------------------------------------------------------------------------


def test_prepare_image_covers_and_centre_crops_a_wide_image():
    # Three vertical stripes: red | white | blue, 300x100. Into a 128x64 bucket it is scaled to 192x64 and
    # 32 pixels are cut from each side.
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    img.paste(RED, (0, 0, 100, 100))
    img.paste(BLUE, (200, 0, 300, 100))

    pixels, (top, left) = prepare_image(img, (128, 64))
    assert pixels.shape == (3, 64, 128) and pixels.dtype == torch.float32
    assert (top, left) == (0, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[:, 32, 64], torch.ones(3))  # white centre maps to +1
    assert torch.allclose(pixels[:, 32, 2], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)  # red edge kept
    assert torch.allclose(pixels[:, 32, 125], torch.tensor([-1.0, -1.0, 1.0]), atol=0.05)  # blue edge kept


def test_prepare_image_tall_image_offset_and_upscaling():
    pixels, (top, left) = prepare_image(Image.new("RGB", (50, 200), (0, 0, 0)), (64, 128))
    assert pixels.shape == (3, 128, 64) and (top, left) == (64, 0)  # 50x200 -> 64x256, 64 cut above and below
    assert torch.all(pixels == -1)


def test_upscale_warnings_name_small_images_only():
    items = [ImageItem(Path("photo.png"), "", 96, 128), ImageItem(Path("big.png"), "", 1024, 1024),
             ImageItem(Path("narrow.png"), "", 2000, 400)]
    warnings = upscale_warnings(items, [(512, 512), (512, 512), (512, 512)])
    assert warnings[0] == ("photo.png is 96x128 and is upscaled to 512x512; a larger image trains sharper "
                           "details")
    assert len(warnings) == 2 and warnings[1].startswith("narrow.png is 2000x400")


def test_flip_mirrors_left_right():
    pixels = torch.arange(6.0).reshape(1, 1, 6).expand(3, 2, 6)
    assert flip(pixels)[0, 1].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]


def test_color_augment_is_mild_seeded_and_keeps_grey_grey():
    pixels = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    a = color_augment(pixels, torch.Generator().manual_seed(1))
    b = color_augment(pixels, torch.Generator().manual_seed(1))
    c = color_augment(pixels, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, pixels) and a.shape == pixels.shape
    assert a.min() >= -1 and a.max() <= 1
    assert (a - pixels).abs().mean() < 0.3  # modest: the picture is still the same picture

    grey = torch.full((3, 4, 4), 0.2)
    out = color_augment(grey, torch.Generator().manual_seed(3))
    assert torch.allclose(out[0], out[1], atol=1e-5) and torch.allclose(out[1], out[2], atol=1e-5)


# --- batching -------------------------------------------------------------------------------------------------


BUCKETS_OF_ITEMS = [(512, 512)] * 9 + [(768, 320)] * 5 + [(320, 768)] * 1


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_batches_never_mix_buckets_and_cover_every_image_each_epoch():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 4, torch.Generator().manual_seed(0))
    assert sampler.batches_per_epoch == 3 + 2 + 1
    batches = _take(sampler, 3 * sampler.batches_per_epoch)
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({BUCKETS_OF_ITEMS[i] for i in batch}) == 1
    for epoch in range(3):
        indexes = [i for b in batches[epoch * 6:(epoch + 1) * 6] for i in b]
        assert sorted(indexes) == list(range(len(BUCKETS_OF_ITEMS)))
    assert [len(b) for b in batches if BUCKETS_OF_ITEMS[b[0]] == (320, 768)] == [1, 1, 1]


def test_each_epoch_groups_images_differently():
    sampler = BucketBatchSampler(BUCKETS_OF_ITEMS, 4, torch.Generator().manual_seed(0))
    batches = _take(sampler, 2 * sampler.batches_per_epoch)
    first, second = ({frozenset(b) for b in part} for part in (batches[:6], batches[6:]))
    assert first != second


def test_batch_order_mixes_buckets():
    # Training all square batches and then all wide ones would swing the model; batches must interleave.
    bucket_of_item = [(512, 512)] * 8 + [(768, 320)] * 8
    sampler = BucketBatchSampler(bucket_of_item, 2, torch.Generator().manual_seed(0))
    epoch = [bucket_of_item[batch[0]] for batch in _take(sampler, sampler.batches_per_epoch)]
    switches = sum(a != b for a, b in zip(epoch, epoch[1:]))
    assert switches > 1  # more than one run of each bucket


def test_sampler_is_repeatable_per_seed():
    def run(seed):
        return _take(BucketBatchSampler(BUCKETS_OF_ITEMS, 2, torch.Generator().manual_seed(seed)), 30)

    assert run(5) == run(5)
    assert run(5) != run(6)
    first_epoch = run(5)[:9]
    assert first_epoch != run(5)[9:18]  # a new order every epoch
