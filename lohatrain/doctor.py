"""The dataset doctor: what in a training folder will hurt the LoRA, each problem naming its file, before
anything is trained (the tab's *Check dataset* and `POST /lohatrain/v1/dataset/check`).

Kinds: `broken` (does not open), `duplicate` (the same pixels as another image), `near_duplicate` (a resized,
re-encoded or slightly cropped copy: perceptual hashes from the ImageHash library within a few bits),
`small` (much smaller than its bucket: trains blurry), `extreme_aspect` (far wider or taller than any bucket:
most of it is cropped away), `missing_caption`, `empty_caption` and `trigger_missing` (a caption without the
trigger phrase most captions share); with masked loss, `mask_unusable` (a mask file that does not open or is not
its image's size) and `empty_mask` (all black: the image trains nothing). Plus tag frequencies, how many images
have a mask, a suggested step count with its reason, and per image folder (kohya's `N_name` sub-folders, the
regularization folder's) its repeats, draws and share of an epoch.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from . import dataset as ds
from .settings import bucket_sides_for

NEAR_DUPLICATE_BITS = 8  # of 64: a resize, a re-encode or a crop of a few percent stays within this
NEAR_DUPLICATE_COLOUR = 12  # largest difference (of 255) of the mean red, green or blue: the perceptual hash
#                             sees only grey levels, so one shape drawn in two colours would match without it
SMALL_FACTOR = 1.5  # an image needing more than this upscale to cover its bucket is "small"
EXTREME_ASPECT = 2.5  # width/height (or height/width) past which a bucket crops away most of the image


@dataclass
class Problem:
    file: str
    kind: str
    message: str


@dataclass
class Folder:
    """One image folder: an `N_name` sub-folder, or the chosen folder itself (its own name), training or
    regularization; `draws` per epoch and their `share` of the epoch's."""

    name: str
    regularization: bool
    repeats: int
    images: int
    draws: int
    share: float
    trigger: str


@dataclass
class Report:
    images: int  # training images (without repeats)
    problems: list[Problem]
    tag_frequency: dict[str, int]
    trigger: str
    suggested_steps: int
    steps_reason: str
    skipped: list[str]  # checks that could not run here, and why
    folders: list[Folder] = field(default_factory=list)
    regularization_images: int = 0
    masks: int = 0  # images (training and regularization) with a mask, an alpha channel or a mask file: what
    #                 masked_loss would use

    def to_dict(self) -> dict:
        return asdict(self)


def check(folder: str | Path, caption_mode: str = "txt", caption_ext: str = ".txt", caption_phrase: str = "",
          resolution: int = 512, batch_size: int = 1, bucketing: bool = True, bucket_min_side: int | None = None,
          bucket_max_side: int | None = None, reg_data_dir: str | Path = "", masked_loss: bool = False) -> Report:
    """Read every image once (the regularization folder's too) and report what will hurt (with `masked_loss`, in
    its mask too). Raises DatasetError only for a folder that is not there, holds no images at all, or whose
    sub-folders are not kohya's `N_name`."""
    given, folder = folder, ds._existing_folder(folder)
    subs = [(sub, False) for sub in ds.subfolders(folder, given)]
    if str(reg_data_dir).strip():
        ds.check_apart(given, reg_data_dir)
        reg_folder = ds._existing_folder(reg_data_dir, "regularization folder")
        subs += [(sub, True) for sub in ds.subfolders(reg_folder, reg_data_dir, "regularization folder")]
    low, high = bucket_sides_for(resolution)
    min_side, max_side = bucket_min_side or low, bucket_max_side or high
    buckets = ds.make_buckets(resolution, min(min_side, resolution), max(max_side, resolution)) if bucketing else [
        (resolution, resolution)]

    problems: list[Problem] = []
    items: list[ds.ImageItem] = []  # the images that open, as a run would draw them
    captions: dict[str, str] = {}  # by label: the training images' captions that could be read
    order: dict[str, int] = {}
    try:
        import imagehash  # the WebUI has its dependencies (scipy, PyWavelets: scikit-image); install.py adds it
        skipped = []
    except ImportError as e:
        imagehash, skipped = None, [f"near duplicates: the ImageHash library cannot be imported ({e})"]
    seen = _Seen(imagehash)

    for sub, regularization in subs:
        for path in sub.images:
            name = ds.ImageItem(path, "", 0, 0, sub.name, sub.repeats, regularization).label
            order[name] = len(order)
            try:
                with ds.decode_image(path) as stored, ds.to_rgb(stored) as img:
                    mask = ds.mask_source(path, sub.files, stored)
                    size = img.size
                    problems += seen.duplicate_problems(name, img)
            except ds.DatasetError:
                problems.append(Problem(name, "broken", f"{name} cannot be read (damaged, incomplete, or not "
                                                        "really an image): re-save it as PNG or JPEG, or remove it"))
                continue
            problems += _size_problems(name, size, buckets)
            caption = _caption(name, path, sub, regularization, caption_mode, caption_ext, caption_phrase, problems)
            items.append(ds.ImageItem(path, caption or "", *size, sub.name, sub.repeats, regularization, mask))
            if masked_loss:
                problems += _mask_problems(items[-1])
            if caption is not None and not regularization:
                captions[name] = caption

    trigger = ds.one_line(caption_phrase) if caption_mode == "phrase" else _shared_first_tag(captions)
    triggers = {}
    for sub, regularization in subs:
        own = {name: text for name, text in captions.items() if name.rpartition("/")[0] == sub.name}
        triggers[sub.name, regularization] = "" if regularization else (
            ds.one_line(caption_phrase) if caption_mode == "phrase" else _shared_first_tag(own))
        if triggers[sub.name, regularization] and caption_mode == "txt":
            problems += _trigger_problems(own, triggers[sub.name, regularization])
    frequency = ds.count_tags(captions.values())
    draws = ds.draws_per_epoch(items)
    counts = ds.folder_counts(items, draws)
    epoch = max(1, sum(draws))
    folders = [Folder(c.name or Path(reg_data_dir if c.regularization else given).name, c.regularization,
                      c.repeats, c.images, c.draws, c.draws / epoch, triggers[c.name, c.regularization])
               for c in counts]
    train_images = sum(len(sub.images) for sub, regularization in subs if not regularization)
    steps, reason = suggest_steps(train_images, batch_size, counts)
    problems.sort(key=lambda p: (order.get(p.file, 0), p.kind))
    return Report(train_images, problems, frequency, trigger, steps, reason, skipped, folders,
                  sum(len(sub.images) for sub, regularization in subs if regularization),
                  sum(item.mask is not None for item in items))



class _Seen:
    """The images read so far, by their exact pixels and (with ImageHash) perceptual hash and mean colour."""

    def __init__(self, imagehash):
        self.imagehash = imagehash
        self.exact: dict[str, str] = {}
        self.hashes: list[tuple[str, object, list[int]]] = []

    def duplicate_problems(self, name: str, img: Image.Image) -> list[Problem]:
        """The image's `duplicate` or `near_duplicate` problem, if an image read before is its twin."""
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        if digest in self.exact:
            return [Problem(name, "duplicate", f"{name} is the same image as {self.exact[digest]}")]
        self.exact[digest] = name
        if not self.imagehash:
            return []
        perceptual = self.imagehash.phash(img)
        colours = list(img.convert("RGB").resize((1, 1), Image.BOX).tobytes())
        twin = next((other for other, h, c in self.hashes if perceptual - h <= NEAR_DUPLICATE_BITS
                     and max(abs(a - b) for a, b in zip(colours, c)) <= NEAR_DUPLICATE_COLOUR), None)
        self.hashes.append((name, perceptual, colours))
        if not twin:
            return []
        return [Problem(name, "near_duplicate", f"{name} is nearly the same image as {twin} (resized, re-encoded or "
                                                "cropped): it weighs double in training")]


def _trigger_problems(captions: dict[str, str], trigger: str) -> list[Problem]:
    return [Problem(name, "trigger_missing", f"{name}'s caption lacks the trigger {trigger!r} that the other "
                                             "captions start with")
            for name, text in captions.items()
            if text.strip() and trigger.lower() not in [t.lower() for t in ds.split_tags(text)]]


def _mask_problems(item: ds.ImageItem) -> list[Problem]:
    """An image's mask that masked loss cannot use, or that trains nothing; none for an image without a mask."""
    if item.mask is None:
        return []
    name = item.label
    unusable = ds.check_mask(item)
    if unusable:
        return [Problem(name, "mask_unusable", f"{unusable}: a mask must be a PNG of the same size as its image")]
    if ds.load_mask(item).getextrema()[1] == 0:
        source = "its alpha channel" if item.mask == item.path else item.mask.name
        return [Problem(name, "empty_mask", f"{name}'s mask ({source}) is all black, so with masked loss it trains "
                                            "nothing: make the subject white (opaque)")]
    return []


def _size_problems(name: str, size: tuple[int, int], buckets) -> list[Problem]:
    width, height = size
    bucket = ds.assign_bucket(width, height, buckets)
    found = []
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale > SMALL_FACTOR:
        found.append(Problem(name, "small", f"{name} is {width}x{height}, {scale:.1f}x smaller than its bucket "
                                            f"{bucket[0]}x{bucket[1]}: it trains blurry; use a larger image"))
    aspect = max(width / height, height / width)
    if aspect > EXTREME_ASPECT:
        kept = min(bucket[0] / (width * scale), 1) * min(bucket[1] / (height * scale), 1)
        found.append(Problem(name, "extreme_aspect", f"{name} is {width}x{height} ({aspect:.1f}:1): its bucket "
                                                     f"{bucket[0]}x{bucket[1]} keeps {kept:.0%} of it; crop it "
                                                     "to the part that matters"))
    return found


def _caption(name: str, path: Path, sub: ds.Subfolder, regularization: bool, mode: str, ext: str, phrase: str,
             problems: list[Problem]) -> str | None:
    """The image's caption as a run reads it (lohatrain.dataset.scan_dataset), or None when there is none to read
    (a problem says why, where the mode needs one)."""
    if mode != "txt":
        if mode == "phrase":
            return sub.class_tokens if regularization else phrase
        return None
    caption_file = ds.caption_file(path, sub.files, ext)
    if caption_file is None:
        if sub.class_tokens:  # kohya's class tokens: the folder's name captions it
            return ds.one_line(sub.class_tokens)
        problems.append(Problem(name, "missing_caption", f"{name} has no {path.stem}{ext}"))
        return None
    try:
        text = caption_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        problems.append(Problem(name, "missing_caption", f"{name}'s caption {caption_file.name} is not UTF-8 text"))
        return None
    if not text.strip():
        problems.append(Problem(name, "empty_caption", f"{name}'s caption {caption_file.name} is empty"))
    return ds.one_line(text)


def _shared_first_tag(captions: dict[str, str]) -> str:
    """The first tag most captions start with (a trigger word), or "" when none is shared by more than half."""
    firsts = Counter(ds.split_tags(c)[0].lower() for c in captions.values() if ds.split_tags(c))
    if not firsts:
        return ""
    tag, count = max(sorted(firsts.items()), key=lambda kv: kv[1])
    return tag if count * 2 > len(captions) else ""


def suggest_steps(images: int, batch_size: int, folders: list[ds.FolderCount] | None = None) -> tuple[int, str]:
    """About 100 looks at each image (what character and style LoRAs commonly get), between 400 and 4000 steps.
    With kohya's folders, 100 on average (a folder of more repeats gets more of them) and the regularization
    images' draws on top."""
    batch_size = max(1, batch_size)
    train = [f for f in folders or [] if not f.regularization]
    kohya = bool(folders) and (len(folders) > 1 or folders[0].repeats > 1)
    if not kohya:
        raw = math.ceil(100 * images / batch_size)
        said = f"{images} images at batch size {batch_size}: about 100 passes over each image is {raw} steps"
    else:
        train_draws, epoch = sum(f.draws for f in train), sum(f.draws for f in folders)
        raw = math.ceil(100 * images * epoch / max(1, train_draws) / batch_size)
        reg = epoch - train_draws
        said = (f"{images} images in {len(train)} folder(s) ({', '.join(f'{f.name} ×{f.repeats}' for f in train)}), "
                f"{train_draws} draws per epoch" + (f" and {reg} regularization draws" if reg else "")
                + f", at batch size {batch_size}: about 100 passes over each image on average is {raw} steps "
                f"({raw * batch_size / max(1, epoch):.1f} epochs)")
    steps = min(4000, max(400, int(math.ceil(raw / 50) * 50)))
    reason = said + (f", kept within 400–4000: {steps}" if steps != math.ceil(raw / 50) * 50 else
                     f", rounded to {steps}")
    return steps, reason
