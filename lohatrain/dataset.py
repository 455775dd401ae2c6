"""The training images: finding and checking them, captions, aspect-ratio buckets, tensors, augmentation, batching.

Everything a user can get wrong about the dataset folder is found by `scan_dataset` before training starts and
reported in one `DatasetError`, so a broken dataset never costs a model load or a crash halfway through training.

A dataset folder is flat (its images directly in it) or kohya's: sub-folders named `N_name`, each trained N times
per epoch (its repeats), whose name after `N_` captions an image without a caption file (kohya's class tokens).
A regularization folder (class images) follows the same rule; its images weigh `prior_loss_weight` in the loss.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg is photo's mask (masked loss), not a training image
CAPTION_MODES = ("none", "phrase", "txt")

Bucket = tuple[int, int]  # (width, height) in pixels

# What Pillow raises for files it cannot identify or decode (truncated data, wrong format, absurd sizes).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MAX_LISTED = 10
REPEATS_NAME = re.compile(r"(\d+)_(.*)", re.DOTALL)  # kohya's `N_name` sub-folder: N repeats, then its class tokens
MAX_REPEATS = 1000  # an epoch lists every draw (and a run's state saves the rest of it)
REG_LABEL = "regularization"


@dataclass(frozen=True)
class ImageItem:
    """One training image; width and height are as displayed, i.e. after EXIF rotation. `folder` is its `N_name`
    sub-folder ("" when it lies directly in the chosen folder), `repeats` its draws per epoch."""

    path: Path
    caption: str
    width: int
    height: int
    folder: str = ""
    repeats: int = 1
    regularization: bool = False
    mask: Path | None = None  # masked loss: its mask file, or the image itself (its alpha channel); None: no mask

    @property
    def label(self) -> str:
        """How messages and the resume record name it: its file name, under its sub-folder and, for a
        regularization image, under "regularization/"."""
        return self.label_of(self.path.name)

    def label_of(self, file_name: str) -> str:
        """A file beside the image (its mask) named as the image is named."""
        name = f"{self.folder}/{file_name}" if self.folder else file_name
        return f"{REG_LABEL}/{name}" if self.regularization else name


@dataclass(frozen=True)
class Subfolder:
    """A folder of images with kohya's repeats: an `N_name` sub-folder, or the chosen folder itself (name "")."""

    path: Path
    name: str
    repeats: int
    class_tokens: str  # kohya's: the name after `N_`, the caption of an image without a caption file
    files: dict[str, Path]
    images: list[Path]

    def label(self, file_name: str) -> str:
        return f"{self.name}/{file_name}" if self.name else file_name


def load_image(path: str | Path) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB, upright, with transparency flattened onto white.

    Decoding everything (not just the header) is what catches truncated downloads before training starts.
    """
    return to_rgb(decode_image(path))


def decode_image(path: str | Path) -> Image.Image:
    """The image fully decoded and upright, as stored (any mode)."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except _DECODE_ERRORS as exc:
        raise DatasetError(
            f"{path} cannot be read as an image ({exc}). Re-save it as PNG or JPEG, or remove it from the "
            "dataset folder."
        ) from exc


def _has_alpha(img: Image.Image) -> bool:
    """Pillow 10.1's `has_transparency_data`, spelled out: the WebUI pins Pillow 9.5."""
    return img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, with transparency flattened onto white (what the VAE sees, masked loss or not)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_grey(img)
    if _has_alpha(img):
        # Transparent pixels keep whatever colour the editor left there (often black); white is what people see.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


def _sixteen_bit_to_grey(img: Image.Image) -> Image.Image:
    """Scale 0..65535 down to 0..255; Pillow's own conversion clips, turning most 16-bit images white."""
    values = np.asarray(img).astype(np.float64)
    return Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8), mode="L")


def scan_dataset(folder: str | Path, caption_mode: str, caption_phrase: str = "", caption_ext: str = ".txt",
                 reg_data_dir: str | Path = "", masked_loss: bool = False) -> list[ImageItem]:
    """List the dataset's images with their captions, sorted by sub-folder and file name so runs are repeatable;
    with `reg_data_dir`, its regularization images follow.

    caption_mode: "none" (empty captions), "phrase" (`caption_phrase` for every image) or "txt" (the text file
    named like the image with `caption_ext`; in an `N_name` sub-folder an image without one takes the folder's
    name after `N_`, as kohya). Regularization images never take the phrase (it is the trigger): with "phrase"
    their folder's name captions them. Every image is decoded once here, and all problems (missing captions,
    unreadable captions, broken images) are reported together so the user can fix them in one go. Hidden files
    and folders (names starting with ".", e.g. macOS "._photo.jpg" leftovers) are ignored. With `masked_loss`
    each image's mask is found (`mask_source`) and checked: it must open and be the size of its image; some
    training image must have one.
    """
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, not {caption_mode!r}")
    phrase = one_line(caption_phrase)
    if caption_mode == "phrase" and not phrase:
        raise DatasetError("Captions is set to Single Phrase but the phrase is empty. Type a phrase, or choose "
                           "No Caption or TXT Captions.")
    items = _scan_folder(folder, caption_mode, phrase, caption_ext, False, masked_loss)
    if str(reg_data_dir).strip():
        check_apart(folder, reg_data_dir)
        items += _scan_folder(reg_data_dir, caption_mode, phrase, caption_ext, True, masked_loss)
    return items


def _scan_folder(given: str | Path, caption_mode: str, phrase: str, caption_ext: str, regularization: bool,
                 masked_loss: bool) -> list[ImageItem]:
    what = "regularization folder" if regularization else "dataset folder"
    folder = _existing_folder(given, what)
    items: list[ImageItem] = []
    missing: list[str] = []
    not_utf8: list[str] = []
    broken: list[str] = []
    for sub in subfolders(folder, given, what):
        for image_path in sub.images:
            caption = _caption(sub, image_path, caption_mode, phrase, caption_ext, regularization, missing, not_utf8)
            try:
                with decode_image(image_path) as img:
                    mask = mask_source(image_path, sub.files, img) if masked_loss else None
                    items.append(ImageItem(image_path, caption, img.width, img.height, sub.name, sub.repeats,
                                           regularization, mask))
            except DatasetError:
                broken.append(sub.label(image_path.name))

    problems = []
    if missing:
        problems.append(
            f"{len(missing)} caption file(s) are missing: {_name_list(missing)}. Captions is set to TXT Captions, "
            f"so every image needs a text file with the same name (photo.png needs photo{caption_ext}). Add them, "
            + ("or put the images in a sub-folder named after their class, such as 1_dog (its name then captions "
               "them)." if regularization else "or choose No Caption or Single Phrase."))
    if not_utf8:
        problems.append(f"{len(not_utf8)} caption file(s) are not UTF-8 text: {_name_list(not_utf8)}. "
                        "Re-save them with UTF-8 encoding.")
    if broken:
        problems.append(f"{len(broken)} image(s) cannot be read (damaged, incomplete, or not really an image): "
                        f"{_name_list(broken)}. Re-save them as PNG or JPEG, or remove them from the {what}.")
    problems += _mask_problems(items, masked_loss, regularization)
    if problems:
        raise DatasetError(f"The {what} {given} needs fixing:\n" + "\n".join(problems))
    return items


def _mask_problems(items: list[ImageItem], masked_loss: bool, regularization: bool) -> list[str]:
    """With masked loss: the masks that cannot be used, and a dataset folder where no image has one (a
    regularization folder's class images may all train whole)."""
    if not masked_loss:
        return []
    problems, unusable = [], [problem for problem in map(check_mask, items) if problem]
    if unusable:
        problems.append(f"{len(unusable)} mask(s) cannot be used: {_name_list(unusable)}. A mask must be a "
                        "PNG of the same size as its image (white trains, black does not).")
    if not regularization and items and not any(item.mask for item in items):
        problems.append(f"masked_loss is on but no image has a mask: give the images a transparent background "
                        f"(an alpha channel) or a black-and-white mask beside each (photo{MASK_SUFFIX} for "
                        "photo.png, white = train), or turn masked_loss off.")
    return problems


def subfolders(folder: Path, given: str | Path, what: str = "dataset folder") -> list[Subfolder]:
    """The folder's image folders: itself when it holds images (flat, repeats 1), else its `N_name` sub-folders
    by name. A sub-folder with images whose name is not `N_name` with N of 1 or more, an `N_name` sub-folder
    without images, or images both directly in the folder and in `N_name` sub-folders, are refused, all named
    in one message."""
    files, images = list_folder(folder)
    found, problems = [], []
    for sub in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: p.name):
        match = REPEATS_NAME.fullmatch(sub.name)
        if images and not match:  # a flat folder's other sub-folders are not read, as before kohya's layout
            continue
        sub_files, sub_images = list_folder(sub)
        if images:
            if sub_images:
                problems.append(f"{sub.name} holds images too, and so does the folder itself. Put the loose images "
                                f"into a sub-folder such as 1_{folder.name}, or move the sub-folders out")
            continue
        if not match:
            if sub_images:
                problems.append(f"{sub.name} is not named N_name (kohya's repeats, then a name: 10_alice), so "
                                "its images would not be trained. Rename it")
            continue
        repeats = int(match.group(1))
        if not 1 <= repeats <= MAX_REPEATS:
            problems.append(f"{sub.name} has {repeats} repeats: the N of N_name must be from 1 to {MAX_REPEATS}")
        elif not sub_images:
            problems.append(f"{sub.name} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Add images or remove it")
        else:
            found.append(Subfolder(sub, sub.name, repeats, match.group(2), sub_files, sub_images))
    if problems:
        raise DatasetError(f"The {what} {given} needs fixing:\n" + "\n".join(f"{p}." for p in problems))
    if images:
        return [Subfolder(folder, "", 1, "", files, images)]
    if not found:
        raise DatasetError(
            f"No images found in the {what} {given}. Supported file types: {', '.join(IMAGE_EXTENSIONS)}. Put "
            "your images directly in this folder, or in sub-folders named N_name (kohya's repeats: 10_alice "
            "trains each of its images 10 times per epoch).")
    return found


def list_folder(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    """The folder's files by name (hidden ones left out, e.g. macOS "._photo.jpg") and its images by name; an
    image's mask (photo.mask.png beside photo.png) is not an image of its own."""
    files = {p.name: p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}
    images = [p for p in files.values() if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.stem.lower() for p in images}
    return files, sorted((p for p in images if not (p.name.lower().endswith(MASK_SUFFIX)
                                                    and p.name[:-len(MASK_SUFFIX)].lower() in stems)),
                         key=lambda p: p.name)


def mask_file(image_path: Path, files: dict[str, Path]) -> Path | None:
    """The mask file beside an image (photo.mask.png for photo.jpg), found as `caption_file` finds captions."""
    name = image_path.stem + MASK_SUFFIX
    return files.get(name) or next((p for n, p in files.items() if n.lower() == name.lower()), None)


def mask_source(image_path: Path, files: dict[str, Path], image: Image.Image) -> Path | None:
    """Where an image's mask comes from (kohya's masked loss): its mask file, else its own alpha channel (the
    image's path), else nowhere: the whole image trains."""
    return mask_file(image_path, files) or (image_path if _has_alpha(image) else None)


def check_mask(item: ImageItem) -> str | None:
    """Why an image's mask file cannot be used (it does not open, or it is not the image's size), or None."""
    if item.mask is None or item.mask == item.path:
        return None
    name = item.label_of(item.mask.name)
    try:
        with decode_image(item.mask) as mask:
            size = mask.size
    except DatasetError:
        return f"{name} does not open as an image"
    if size != (item.width, item.height):
        return f"{name} is {size[0]}x{size[1]} but {item.label} is {item.width}x{item.height}"
    return None


def load_mask(item: ImageItem) -> Image.Image | None:
    """An image's mask in grey levels (L: 255 trains fully, 0 not at all), or None for an image without one."""
    if item.mask is None:
        return None
    with decode_image(item.mask) as img:
        return img.convert("RGBA").getchannel("A") if item.mask == item.path else img.convert("L")


def caption_file(image_path: Path, files: dict[str, Path], caption_ext: str) -> Path | None:
    """The caption file of an image, if there is one. Case-insensitive: "photo.TXT" beside "photo.png" works on
    Windows, so it should here too."""
    name = image_path.stem + caption_ext
    return files.get(name) or next((p for n, p in files.items() if n.lower() == name.lower()), None)


def _caption(sub: Subfolder, image_path: Path, mode: str, phrase: str, ext: str, regularization: bool,
             missing: list[str], not_utf8: list[str]) -> str:
    """An image's caption by the caption mode; a missing or unreadable caption file is added to `missing` or
    `not_utf8` (by its label) and reads as ""."""
    if mode == "none":
        return ""
    if mode == "phrase":
        return sub.class_tokens if regularization else phrase
    caption_path = caption_file(image_path, sub.files, ext)
    try:
        if caption_path is not None:
            return one_line(caption_path.read_bytes().decode("utf-8-sig"))
    except FileNotFoundError:  # removed since the folder was listed
        pass
    except UnicodeDecodeError:
        not_utf8.append(sub.label(caption_path.name))
        return ""
    if sub.class_tokens:
        return one_line(sub.class_tokens)
    missing.append(sub.label(image_path.stem + ext))
    return ""


def check_apart(dataset_dir: str | Path, reg_data_dir: str | Path) -> None:
    """The regularization folder must be neither the dataset folder nor inside it (nor hold it): its images would
    be training images, or the other way round."""
    dataset, reg = resolve_folder(dataset_dir), resolve_folder(reg_data_dir)
    if reg == dataset:
        raise DatasetError(f"The regularization folder {reg_data_dir} is the dataset folder. Choose a separate "
                           "folder of class images (pictures of the kind of thing you train, not of it).")
    if dataset in reg.parents:
        raise DatasetError(f"The regularization folder {reg_data_dir} is inside the dataset folder {dataset_dir}. "
                           "Move it out, so its images are not read as training images.")
    if reg in dataset.parents:
        raise DatasetError(f"The dataset folder {dataset_dir} is inside the regularization folder {reg_data_dir}. "
                           "Keep the two folders side by side.")


def resolve_folder(folder: str | Path) -> Path:
    """The folder a user-given path names, as the reader opens it: `~` expanded, relative to the working
    directory (the WebUI's folder), symlinks followed. Path rules check this same path."""
    return Path(folder).expanduser().resolve()


def _existing_folder(folder: str | Path, what: str = "dataset folder") -> Path:
    if not str(folder).strip():
        raise DatasetError(f"No {what} is set. Enter the folder that holds your training images.")
    path = resolve_folder(folder)
    if not path.exists():
        raise DatasetError(f"The {what} {folder} does not exist. Check the path (copy it from your file "
                           "manager's address bar).")
    if not path.is_dir():
        raise DatasetError(f"{folder} is a file, not a folder. Enter the folder that holds your training images.")
    return path


def one_line(text: str) -> str:
    """Collapse newlines and runs of spaces: the text encoder sees one line either way, and metadata stays tidy."""
    return " ".join(text.split())


def _name_list(names: Sequence[str]) -> str:
    """A readable list that stays short even when a whole folder of files has the same problem."""
    shown = ", ".join(names[:_MAX_LISTED])
    hidden = len(names) - _MAX_LISTED
    return f"{shown} and {hidden} more" if hidden > 0 else shown


def split_tags(caption: str) -> list[str]:
    return [tag for tag in (part.strip() for part in caption.split(",")) if tag]


@dataclass(frozen=True)
class CaptionVariation:
    """What changes a caption each time its image is drawn, with kohya's names: tag shuffling (so the network does
    not learn the tags' order; the first `keep_tokens`, usually the trigger, stay first), the whole caption
    dropped (`caption_dropout_rate`), single tags dropped (`caption_tag_dropout_rate`); the tags before
    `keep_tokens_separator` (else the first `keep_tokens`), and those after a second separator, stay in place and
    are never dropped."""

    shuffle: bool = False
    keep_tokens: int = 0
    separator: str = ""
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @classmethod
    def of(cls, settings) -> "CaptionVariation":
        return cls(settings.shuffle_tags, settings.keep_tokens, settings.keep_tokens_separator,
                   settings.caption_dropout_rate, settings.caption_tag_dropout_rate)

    @property
    def per_step(self) -> bool:
        """Whether a drawn caption can be one no cache holds (shuffled or with tags left out)."""
        return self.shuffle or self.tag_dropout_rate > 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """The caption as this draw trains it, in kohya's order: dropped whole, else the free tags shuffled,
        then each dropped at the tag rate. Nothing is drawn from `rng` for what is off, so runs without these
        options draw what they always did."""
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return ""
        if not self.per_step:
            return self.fixed(caption)
        first, free, last = self.split(caption)
        if self.shuffle:
            rng.shuffle(free)
        if self.tag_dropout_rate > 0:
            free = [tag for tag in free if rng.random() >= self.tag_dropout_rate]
        return ", ".join(first + free + last)

    def split(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """(the tags kept first, the free tags, the tags kept last): the parts around the separator when the
        caption holds it, else the first `keep_tokens` tags and the rest."""
        if self.separator and self.separator in caption:
            first, rest = caption.split(self.separator, 1)
            free, _, last = rest.partition(self.separator)
            return split_tags(first), split_tags(free), split_tags(last)
        tags = split_tags(caption)
        return tags[:self.keep_tokens], tags[self.keep_tokens:], []

    def fixed(self, caption: str) -> str:
        """The caption when nothing is shuffled or dropped: as written, its separators taken out (the text
        encoder never sees them)."""
        if not (self.separator and self.separator in caption):
            return caption
        return ", ".join(tag for part in self.split(caption) for tag in part)

    def cached_captions(self, captions: Sequence[str]) -> list[str]:
        """Every caption a draw can give when none is shuffled or loses tags (a cache encodes these once): each
        fixed, and the empty one when whole captions are dropped."""
        return [self.fixed(c) for c in captions] + ([""] if self.dropout_rate > 0 else [])


def tag_frequency(items: Sequence[ImageItem]) -> dict[str, int]:
    """How often each tag occurs, most frequent first, for the `ss_tag_frequency` metadata.

    Tags are lower-cased like kohya's sd-scripts does, so WebUI tools show the same counts for our files.
    """
    return count_tags(item.caption for item in items)


def count_tags(captions) -> dict[str, int]:
    """Lower-cased tag counts over `captions`, most frequent first (ties alphabetical)."""
    counts = Counter(tag.lower() for caption in captions for tag in split_tags(caption))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def draws_per_epoch(items: Sequence[ImageItem]) -> list[int]:
    """How often each image is drawn in an epoch, as kohya: a training image its folder's repeats; the
    regularization images, in order, as many draws as all the training images have (first each its folder's
    repeats, then one more each in turn), so both sides weigh alike. When there are more regularization draws than
    that, the last images are left out."""
    draws = [0 if item.regularization else item.repeats for item in items]
    wanted, given = sum(draws), 0
    regularization = [i for i, item in enumerate(items) if item.regularization]
    first_pass = True
    while regularization and given < wanted:
        for i in regularization:
            more = items[i].repeats if first_pass else 1
            draws[i] += more
            given += more
            if given >= wanted:
                break
        first_pass = False
    return draws


def loss_weights(items: Sequence[ImageItem], prior_loss_weight: float) -> torch.Tensor | None:
    """Each image's weight in the loss (kohya's): 1, and `prior_loss_weight` for a regularization image; None when
    there are none (every weight 1: the loss is left as it is)."""
    if not any(item.regularization for item in items):
        return None
    return torch.tensor([prior_loss_weight if item.regularization else 1.0 for item in items])


@dataclass(frozen=True)
class FolderCount:
    """One image folder of a run (an `N_name` sub-folder, or the chosen folder itself: name ""): its repeats,
    images, draws per epoch and tags."""

    name: str
    regularization: bool
    repeats: int
    images: int
    draws: int
    tags: dict[str, int]


def folder_counts(items: Sequence[ImageItem], draws: Sequence[int]) -> list[FolderCount]:
    """The run's folders in order (training, then regularization)."""
    groups: dict[tuple[bool, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[(item.regularization, item.folder)].append(index)
    return [FolderCount(name, reg, items[group[0]].repeats, len(group), sum(draws[i] for i in group),
                        count_tags(items[i].caption for i in group))
            for (reg, name), group in groups.items()]


def make_buckets(resolution: int, min_side: int = 256, max_side: int = 1024, step: int = 64) -> list[Bucket]:
    """All (width, height) sizes whose area is at most resolution², each as tall as allowed for its width.

    Portrait and landscape images then train at about the same pixel count as square ones, without cropping
    most of the picture away. Sides are multiples of `step` so the latents divide evenly.
    """
    if resolution % step or not min_side <= resolution <= max_side:
        raise ValueError(f"resolution {resolution} must be a multiple of {step} between {min_side} and {max_side}")
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, max_area // width // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))  # the same shape turned; keeps portrait and landscape symmetric
    return sorted(buckets)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest to the image's, so the centre crop removes the least.

    Ratios are compared on a log scale so 1:2 and 2:1 are treated alike; on a tie the larger bucket wins.
    """
    image_ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - image_ratio), -b[0] * b[1]))


def assign_buckets(items: Sequence[ImageItem], resolution: int, bucketing: bool = True,
                   min_side: int = 256, max_side: int = 1024) -> list[Bucket]:
    """The bucket of every item: by aspect ratio with Aspect Ratio Grouping on, the square resolution without."""
    if not bucketing:
        return [(resolution, resolution)] * len(items)
    buckets = make_buckets(resolution, min_side, max_side)
    return [assign_bucket(item.width, item.height, buckets) for item in items]


def cover_size(size: tuple[int, int], bucket: Bucket) -> tuple[int, int]:
    """(width, height) of an image of `size` scaled to just cover the bucket, keeping its aspect ratio."""
    (width, height), (bucket_w, bucket_h) = size, bucket
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def prepare_image(img: Image.Image, bucket: Bucket) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize `img` to just cover the bucket, centre-crop it to the bucket, and make it a model input.

    Returns a float32 (3, height, width) tensor in [-1, 1] and the crop's (top, left) in resized pixels,
    which SDXL takes as a conditioning input.
    """
    if img.mode != "RGB":
        raise ValueError(f"prepare_image needs an RGB image (use load_image), got mode {img.mode}")
    img, (top, left) = _cover_and_crop(img, bucket)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous(), (top, left)


def prepare_mask(mask: Image.Image, bucket: Bucket) -> torch.Tensor:
    """A mask (load_mask) resized and cropped exactly as its image (prepare_image): a (height, width) tensor in
    [0, 1]."""
    mask, _ = _cover_and_crop(mask, bucket)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def _cover_and_crop(img: Image.Image, bucket: Bucket) -> tuple[Image.Image, tuple[int, int]]:
    """`img` resized to just cover the bucket and centre-cropped to it; the crop's (top, left)."""
    bucket_w, bucket_h = bucket
    resized_w, resized_h = cover_size(img.size, bucket)
    if (resized_w, resized_h) != img.size:
        img = img.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
    top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    return img.crop((left, top, left + bucket_w, top + bucket_h)), (top, left)


def upscale_warnings(items: Sequence[ImageItem], buckets_of_items: Sequence[Bucket]) -> list[str]:
    """One line per image smaller than its bucket: upscaled images train blurry, which users should know."""
    return [
        f"{item.label} is {item.width}x{item.height} and is upscaled to {bw}x{bh}; "
        "a larger image trains sharper details"
        for item, (bw, bh) in zip(items, buckets_of_items, strict=True)
        if item.width < bw or item.height < bh
    ]


def flip(pixels: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (the last dimension)."""
    return pixels.flip(-1)


def color_augment(pixels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """A mild random hue rotation (up to ±15°), brightness shift (±5%) and contrast change (±10%).

    Works on (..., 3, H, W) tensors in [-1, 1]; one draw per call. The hue turns colours around the grey axis,
    so greys stay grey. Draws come from `rng` only, so a seeded generator repeats the same augmentation.
    """
    return change_colors(pixels, *color_change(rng))


def color_change(rng: torch.Generator) -> tuple[float, float, float]:
    """One colour augmentation's random draw: hue, brightness and contrast, each in [-1, 1)."""
    hue, brightness, contrast = (torch.rand(3, generator=rng, dtype=torch.float64) * 2 - 1).tolist()
    return hue, brightness, contrast


def change_colors(pixels: torch.Tensor, hue: float, brightness: float, contrast: float) -> torch.Tensor:
    """`color_augment` with its draw given (`color_change`)."""
    angle = math.radians(15 * hue)
    # Rodrigues' rotation about the unit grey axis u = (1, 1, 1)/√3: cos·I + sin·[u]× + (1 - cos)·u·uᵀ.
    u_cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(3)
    u_outer = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    rotation = math.cos(angle) * torch.eye(3, dtype=torch.float64) + math.sin(angle) * u_cross
    rotation = (rotation + (1 - math.cos(angle)) * u_outer).to(device=pixels.device, dtype=pixels.dtype)
    out = torch.einsum("ij,...jhw->...ihw", rotation, pixels)
    mean = out.mean(dim=(-3, -2, -1), keepdim=True)
    out = (out - mean) * (1 + 0.1 * contrast) + mean + 0.1 * brightness
    return out.clamp(-1, 1)


class BucketBatchSampler:
    """Endless batches of item indexes, each batch from one bucket (a batch tensor needs one image size).

    Every epoch shuffles the images within each bucket and then the order of all batches; a bucket's last batch
    may be smaller than `batch_size`. An image is in an epoch as often as `draws` says (kohya's repeats,
    `draws_per_epoch`), else once. All randomness comes from `generator`, so a seed repeats the run; the
    generator's state and the epoch's batches still to come are the whole state (`state_dict`), so a resumed
    run draws the same batches as one that never stopped.
    """

    def __init__(self, bucket_of_item: Sequence[Bucket], batch_size: int, generator: torch.Generator,
                 draws: Sequence[int] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        draws = [1] * len(bucket_of_item) if draws is None else draws
        if not sum(draws):
            raise ValueError("no items to sample from")
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for index, (bucket, times) in enumerate(zip(bucket_of_item, draws, strict=True)):
            groups[tuple(bucket)] += [index] * times
        self._groups = [groups[b] for b in sorted(groups) if groups[b]]
        self.batch_size = batch_size
        self.generator = generator
        self._pending: list[list[int]] = []

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(group) / self.batch_size) for group in self._groups)

    def _epoch(self) -> list[list[int]]:
        batches = []
        for group in self._groups:
            order = torch.randperm(len(group), generator=self.generator).tolist()
            shuffled = [group[i] for i in order]
            batches += [shuffled[i:i + self.batch_size] for i in range(0, len(shuffled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def next_batch(self) -> list[int]:
        if not self._pending:
            self._pending = self._epoch()
        return self._pending.pop(0)

    def upcoming(self, count: int) -> list[list[int]]:
        """The next `count` batches, as `next_batch` will give them; the sampler's state is left as it was."""
        state = self.state_dict()
        batches = [self.next_batch() for _ in range(count)]
        self.load_state_dict(state)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "pending": [list(b) for b in self._pending]}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self._pending = [list(b) for b in state["pending"]]


def grouping_note(items: Sequence[ImageItem], bucket_of_item: Sequence[Bucket], resolution: int, bucketing: bool,
                  min_side: int, max_side: int) -> str | None:
    """Why Aspect Ratio Grouping changes nothing for this dataset, or None when it does group."""
    used = {tuple(b) for b in bucket_of_item}
    if not bucketing or len(used) != 1:
        return None
    (width, height), = used
    if len(make_buckets(resolution, min_side, max_side)) == 1:
        return (f"Aspect ratio grouping has no effect: with bucket sides {min_side}–{max_side} px at {resolution} "
                f"px the only bucket is {width}×{height}. Lower the bucket min side or raise the max side to "
                "allow other shapes.")
    return (f"Aspect ratio grouping has no effect: every image is closest to the {width}×{height} bucket "
            "(they all have about the same shape).")


def bucket_table(items: Sequence[ImageItem], bucket_of_item: Sequence[Bucket],
                 draws: Sequence[int] | None = None) -> list[tuple[Bucket, int]]:
    """(bucket, image count) per used bucket, narrowest first, to show the user how the dataset was grouped; with
    `draws`, an image counts as often as it is drawn per epoch (kohya's bucket counts)."""
    counts: Counter = Counter()
    for index, (_, bucket) in enumerate(zip(items, bucket_of_item, strict=True)):
        counts[tuple(bucket)] += 1 if draws is None else draws[index]
    return sorted(((b, n) for b, n in counts.items() if n), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0]))
