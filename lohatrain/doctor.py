"""The dataset doctor: what in a training folder will hurt the LoRA, each problem naming its file, before
anything is trained (the tab's *Check dataset* and `POST /lohatrain/v1/dataset/check`).

Kinds (`KINDS`): `broken` (does not open), `duplicate` (the same pixels as another image), `near_duplicate` (a
resized, re-encoded or slightly cropped copy: perceptual hashes from the ImageHash library within a few bits),
`small` (much smaller than its bucket: trains blurry), `extreme_aspect` (far wider or taller than any bucket:
most of it is cropped away), `missing_caption`, `empty_caption` and `trigger_missing` (a caption without the
trigger phrase most captions share). Plus tag frequencies and a suggested step count with its reason.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from . import dataset as ds
from .settings import bucket_sides_for

NEAR_DUPLICATE_BITS = 8  # of 64: a resize, a re-encode or a crop of a few percent stays within this
NEAR_DUPLICATE_COLOUR = 12  # largest difference (of 255) of the mean red, green or blue: the perceptual hash
#                             sees only grey levels, so one shape drawn in two colours would match without it
SMALL_FACTOR = 1.5  # an image needing more than this upscale to cover its bucket is "small"
EXTREME_ASPECT = 2.5  # width/height (or height/width) past which a bucket crops away most of the image
MIN_STEPS, MAX_STEPS = 400, 4000  # fewer rarely trains well; more rarely helps


@dataclass(frozen=True)
class Kind:
    """A kind of problem as the tab lists it: a title, then once for all its files what it does and what to do."""

    title: str
    advice: str
    blocks: bool = False  # training refuses the folder until it is fixed


KINDS = {
    "broken": Kind("Cannot be read", "damaged, incomplete, or not really an image; re-save it as PNG or JPEG, or "
                                     "remove it", blocks=True),
    "duplicate": Kind("Duplicates", "a picture there twice is trained twice as much; remove the copy"),
    "near_duplicate": Kind("Near duplicates", "a resized, re-encoded or cropped copy weighs double in training; "
                                              "keep one"),
    "small": Kind("Too small", "upscaled to its bucket, it trains blurry; use a larger image"),
    "extreme_aspect": Kind("Very wide or tall", "its bucket crops most of it away; crop it to the part that matters"),
    "missing_caption": Kind("Without a caption", "TXT captions need one beside each image; write it, caption the "
                                                 "folder with the WebUI's taggers, or choose another caption mode",
                            blocks=True),
    "empty_caption": Kind("Empty captions", "an empty caption says nothing about its image; write what it shows"),
    "trigger_missing": Kind("Without the trigger", "most captions start with the trigger; add it, so that the LoRA "
                                                   "answers to it"),
}


@dataclass
class Problem:
    file: str
    kind: str  # a key of KINDS
    detail: str  # what was found, said after the file's name ("is 40x40, …")

    @property
    def message(self) -> str:
        """The problem in one sentence: the file, what was found, and its kind's advice."""
        return f"{self.file} {self.detail}: {KINDS[self.kind].advice}"


@dataclass
class Report:
    images: int
    problems: list[Problem]
    tag_frequency: dict[str, int]
    trigger: str
    suggested_steps: int
    steps_reason: str
    skipped: list[str]  # checks that could not run here, and why

    def to_dict(self) -> dict:
        return {**asdict(self), "problems": [{**asdict(p), "message": p.message} for p in self.problems]}

    def by_kind(self) -> dict[str, list[Problem]]:
        """The problems grouped by kind, in KINDS' order, each group in the folder's order."""
        return {kind: found for kind in KINDS if (found := [p for p in self.problems if p.kind == kind])}


def check(folder: str | Path, caption_mode: str = "txt", caption_ext: str = ".txt", caption_phrase: str = "",
          resolution: int = 512, batch_size: int = 1, bucketing: bool = True, bucket_min_side: int | None = None,
          bucket_max_side: int | None = None) -> Report:
    """Read every image once and report what will hurt. Raises DatasetError only for a folder that is not
    there or holds no images at all."""
    folder = ds._existing_folder(folder)
    files, images = ds.list_folder(folder)
    if not images:
        raise ds.DatasetError(f"No images found in {folder.name} (sub-folders are not searched)")
    low, high = bucket_sides_for(resolution)
    min_side, max_side = bucket_min_side or low, bucket_max_side or high
    buckets = ds.make_buckets(resolution, min(min_side, resolution), max(max_side, resolution)) if bucketing else [
        (resolution, resolution)]

    problems: list[Problem] = []
    captions: dict[str, str] = {}
    exact: dict[str, str] = {}
    hashes: list[tuple[str, object, list[int]]] = []
    try:
        import imagehash  # the WebUI has its dependencies (scipy, PyWavelets: scikit-image); install.py adds it
        skipped = []
    except ImportError as e:
        imagehash, skipped = None, [f"near duplicates: the ImageHash library cannot be imported ({e})"]

    for path in images:
        try:
            with ds.load_image(path) as img:
                size = img.size
                digest = hashlib.sha256(img.tobytes()).hexdigest()
                perceptual = imagehash.phash(img) if imagehash else None
                colours = list(img.convert("RGB").resize((1, 1), Image.BOX).tobytes())
        except ds.DatasetError:
            problems.append(Problem(path.name, "broken", "cannot be read"))
            continue
        if digest in exact:
            problems.append(Problem(path.name, "duplicate", f"is the same image as {exact[digest]}"))
        else:
            exact[digest] = path.name
            twin = next((name for name, h, c in hashes if imagehash and perceptual - h <= NEAR_DUPLICATE_BITS and
                         max(abs(a - b) for a, b in zip(colours, c)) <= NEAR_DUPLICATE_COLOUR), None)
            if twin:
                problems.append(Problem(path.name, "near_duplicate", f"is nearly the same image as {twin}"))
            hashes.append((path.name, perceptual, colours))
        problems += _size_problems(path.name, size, buckets)
        caption = _caption(path, files, caption_mode, caption_ext, caption_phrase, problems)
        if caption is not None:
            captions[path.name] = caption

    trigger = ds.one_line(caption_phrase) if caption_mode == "phrase" else _shared_first_tag(captions)
    if trigger and caption_mode == "txt":
        problems += [Problem(name, "trigger_missing", f"has a caption without {trigger!r}")
                     for name, text in captions.items() if text.strip() and trigger.lower() not in
                     [t.lower() for t in ds.split_tags(text)]]
    frequency = ds.count_tags(captions.values())
    steps, reason = suggest_steps(len(images), batch_size)
    order = {p.name: i for i, p in enumerate(images)}
    problems.sort(key=lambda p: (order.get(p.file, 0), p.kind))
    return Report(len(images), problems, frequency, trigger, steps, reason, skipped)


def _size_problems(name: str, size: tuple[int, int], buckets) -> list[Problem]:
    width, height = size
    bucket = ds.assign_bucket(width, height, buckets)
    found = []
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale > SMALL_FACTOR:
        found.append(Problem(name, "small", f"is {width}x{height}, {scale:.1f}x smaller than its "
                                            f"{bucket[0]}x{bucket[1]} bucket"))
    aspect = max(width / height, height / width)
    if aspect > EXTREME_ASPECT:
        kept = min(bucket[0] / (width * scale), 1) * min(bucket[1] / (height * scale), 1)
        found.append(Problem(name, "extreme_aspect", f"is {width}x{height} ({aspect:.1f}:1): its "
                                                     f"{bucket[0]}x{bucket[1]} bucket keeps {kept:.0%} of it"))
    return found


def _caption(path: Path, files: dict, mode: str, ext: str, phrase: str, problems: list[Problem]) -> str | None:
    if mode != "txt":
        return phrase if mode == "phrase" else None
    caption_file = ds.caption_file(path, files, ext)
    if caption_file is None:
        problems.append(Problem(path.name, "missing_caption", f"has no {path.stem}{ext}"))
        return None
    try:
        text = caption_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        problems.append(Problem(path.name, "missing_caption", f"has a caption {caption_file.name} that is not UTF-8 "
                                                              "text"))
        return None
    if not text.strip():
        problems.append(Problem(path.name, "empty_caption", f"has an empty caption {caption_file.name}"))
    return ds.one_line(text)


def _shared_first_tag(captions: dict[str, str]) -> str:
    """The first tag most captions start with (a trigger word), or "" when none is shared by more than half."""
    firsts = Counter(ds.split_tags(c)[0].lower() for c in captions.values() if ds.split_tags(c))
    if not firsts:
        return ""
    tag, count = max(sorted(firsts.items()), key=lambda kv: kv[1])
    return tag if count * 2 > len(captions) else ""


def suggest_steps(images: int, batch_size: int) -> tuple[int, str]:
    """About 100 looks at each image (what character and style LoRAs commonly get), between 400 and 4000 steps;
    the reason in plain words."""
    batch_size = max(1, batch_size)
    raw = math.ceil(100 * images / batch_size)
    steps = min(MAX_STEPS, max(MIN_STEPS, int(math.ceil(raw / 50) * 50)))
    looks = round(steps * batch_size / images)
    given = f"{images} images at batch size {batch_size}"
    if raw < MIN_STEPS:
        return steps, (f"{given}: {steps} steps, the fewest that train well, show each image about {looks} times "
                       "(about 100 is usual)")
    if raw > MAX_STEPS:
        return steps, f"{given}: {steps} steps show each image about {looks} times; more steps rarely help"
    return steps, f"{given}: {steps} steps show each image about {looks} times, as character and style LoRAs need"
