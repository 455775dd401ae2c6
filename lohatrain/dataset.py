"""The training images: finding and checking them, captions, aspect-ratio buckets, tensors, augmentation, batching.

Everything a user can get wrong about the dataset folder is found by `scan_dataset` before training starts and
reported in one `DatasetError`, so a broken dataset never costs a model load or a crash halfway through training.
"""
from __future__ import annotations

import math
import random
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


@dataclass(frozen=True)
class ImageItem:
    """One training image; width and height are as displayed, i.e. after EXIF rotation."""

    path: Path
    caption: str
    width: int
    height: int
    mask: Path | None = None  # masked loss: its mask file, or the image itself (its alpha channel); None: no mask


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


def scan_dataset(
    folder: str | Path, caption_mode: str, caption_phrase: str = "", caption_ext: str = ".txt",
    masked_loss: bool = False,
) -> list[ImageItem]:
    """List the images directly in `folder` with their captions, sorted by file name so runs are repeatable.

    caption_mode: "none" (empty captions), "phrase" (`caption_phrase` for every image) or "txt" (the text file
    named like the image with `caption_ext`). Every image is decoded once here, and all problems (missing
    captions, unreadable captions, broken images) are reported together so the user can fix them in one go.
    Hidden files (names starting with ".", e.g. macOS "._photo.jpg" leftovers) are ignored. With `masked_loss`
    each image's mask is found (`mask_source`) and checked: it must open and be the size of its image.
    """
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, not {caption_mode!r}")
    phrase = one_line(caption_phrase)
    if caption_mode == "phrase" and not phrase:
        raise DatasetError("Captions is set to Single Phrase but the phrase is empty. Type a phrase, or choose "
                           "No Caption or TXT Captions.")
    given, folder = folder, _existing_folder(folder)
    files, image_paths = list_folder(folder)
    if not image_paths:
        raise DatasetError(
            f"No images found in {given} (sub-folders are not searched). Supported file types: "
            f"{', '.join(IMAGE_EXTENSIONS)}. Put your training images directly in this folder, or choose the "
            "folder that holds them."
        )

    if caption_mode == "txt":
        captions, problems = _read_captions(image_paths, files, caption_ext)
    else:
        captions, problems = [phrase] * len(image_paths), []  # phrase is "" in "none" mode

    items: list[ImageItem] = []
    broken: list[str] = []
    bad_masks: list[str] = []
    for image_path, caption in zip(image_paths, captions):
        try:
            with decode_image(image_path) as img:
                mask = mask_source(image_path, files, img) if masked_loss else None
                items.append(ImageItem(image_path, caption, img.width, img.height, mask))
        except DatasetError:
            broken.append(image_path.name)
            continue
        problem = check_mask(items[-1])
        if problem:
            bad_masks.append(problem)

    if broken:
        problems.append(f"{len(broken)} image(s) cannot be read (damaged, incomplete, or not really an image): "
                        f"{_name_list(broken)}. Re-save them as PNG or JPEG, or remove them from the dataset folder.")
    if bad_masks:
        problems.append(f"{len(bad_masks)} mask(s) cannot be used: {_name_list(bad_masks)}. A mask must be a "
                        "PNG of the same size as its image (white trains, black does not).")
    if masked_loss and items and not any(item.mask for item in items):
        problems.append(f"masked_loss is on but no image has a mask: give the images a transparent background "
                        f"(an alpha channel) or a black-and-white mask beside each (photo{MASK_SUFFIX} for "
                        "photo.png, white = train), or turn masked_loss off.")
    if problems:
        raise DatasetError(f"The dataset folder {given} needs fixing:\n" + "\n".join(problems))
    return items


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
    try:
        with decode_image(item.mask) as mask:
            size = mask.size
    except DatasetError:
        return f"{item.mask.name} does not open as an image"
    if size != (item.width, item.height):
        return f"{item.mask.name} is {size[0]}x{size[1]} but {item.path.name} is {item.width}x{item.height}"
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


def _read_captions(image_paths: list[Path], files: dict[str, Path], caption_ext: str) -> tuple[list[str], list[str]]:
    """The caption of each image from `<stem><caption_ext>`, and a problem line for missing or non-UTF-8 files."""
    captions, missing, not_utf8, problems = [], [], [], []
    for image_path in image_paths:
        caption_name = image_path.stem + caption_ext
        caption_path = caption_file(image_path, files, caption_ext)
        if caption_path is None:
            missing.append(caption_name)
            captions.append("")
            continue
        try:
            captions.append(one_line(caption_path.read_bytes().decode("utf-8-sig")))
        except FileNotFoundError:  # removed since the folder was listed
            missing.append(caption_name)
            captions.append("")
        except UnicodeDecodeError:
            not_utf8.append(caption_path.name)
            captions.append("")
    if missing:
        problems.append(
            f"{len(missing)} caption file(s) are missing: {_name_list(missing)}. Captions is set to TXT Captions, "
            f"so every image needs a text file with the same name (photo.png needs photo{caption_ext}). Add them, "
            "or choose No Caption or Single Phrase."
        )
    if not_utf8:
        problems.append(f"{len(not_utf8)} caption file(s) are not UTF-8 text: {_name_list(not_utf8)}. "
                        "Re-save them with UTF-8 encoding.")
    return captions, problems


def resolve_folder(folder: str | Path) -> Path:
    """The folder a user-given path names, as the reader opens it: `~` expanded, relative to the working
    directory (the WebUI's folder), symlinks followed. Path rules check this same path."""
    return Path(folder).expanduser().resolve()


def _existing_folder(folder: str | Path) -> Path:
    if not str(folder).strip():
        raise DatasetError("No dataset folder is set. Enter the folder that holds your training images.")
    path = resolve_folder(folder)
    if not path.exists():
        raise DatasetError(f"The dataset folder {folder} does not exist. Check the path (copy it from your file "
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


def shuffle_caption(caption: str, rng: random.Random, keep_tokens: int = 0) -> str:
    """Shuffle comma-separated tags so the network does not learn their order; the first `keep_tokens` stay
    first (usually the trigger word)."""
    if keep_tokens < 0:
        raise ValueError(f"keep_tokens must be 0 or more, not {keep_tokens}")
    tags = split_tags(caption)
    rest = tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(tags[:keep_tokens] + rest)


def tag_frequency(items: Sequence[ImageItem]) -> dict[str, int]:
    """How often each tag occurs, most frequent first, for the `ss_tag_frequency` metadata.

    Tags are lower-cased like kohya's sd-scripts does, so WebUI tools show the same counts for our files.
    """
    return count_tags(item.caption for item in items)


def count_tags(captions) -> dict[str, int]:
    """Lower-cased tag counts over `captions`, most frequent first (ties alphabetical)."""
    counts = Counter(tag.lower() for caption in captions for tag in split_tags(caption))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


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
        f"{item.path.name} is {item.width}x{item.height} and is upscaled to {bw}x{bh}; "
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
    may be smaller than `batch_size`. All randomness comes from `generator`, so a seed repeats the run; the
    generator's state and the epoch's batches still to come are the whole state (`state_dict`), so a resumed
    run draws the same batches as one that never stopped.
    """

    def __init__(self, bucket_of_item: Sequence[Bucket], batch_size: int, generator: torch.Generator):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if not bucket_of_item:
            raise ValueError("no items to sample from")
        groups: dict[Bucket, list[int]] = defaultdict(list)
        for index, bucket in enumerate(bucket_of_item):
            groups[tuple(bucket)].append(index)
        self._groups = [groups[b] for b in sorted(groups)]
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


def bucket_table(items: Sequence[ImageItem], bucket_of_item: Sequence[Bucket]) -> list[tuple[Bucket, int]]:
    """(bucket, image count) per used bucket, narrowest first, to show the user how the dataset was grouped."""
    counts = Counter(tuple(bucket) for _, bucket in zip(items, bucket_of_item, strict=True))
    return sorted(counts.items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0][0]))
