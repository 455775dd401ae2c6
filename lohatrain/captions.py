"""Caption files for a dataset folder: what a tagger's output becomes in `<image><ext>`, which images a
captioning pass touches, and saving one caption edited by hand.

The tagger itself is a function image → text given by the caller (the WebUI's DeepBooru or interrogator, in
lohatrain/webui/host.py), so this runs and is tested without the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from . import dataset as ds
from .errors import LohatrainError
from .output import write_atomically

EXISTING = ("keep", "append", "overwrite")  # what happens to an image that already has a caption
NO_CAPTION = "(no caption)"  # a thumbnail's label when the image has no caption file


@dataclass
class CaptionOptions:
    ext: str = ".txt"
    prefix: str = ""  # put first, usually the trigger phrase
    drop_tags: str = ""  # comma-separated tags the tagger may find that the captions should not hold
    existing: str = "keep"

    def validate(self) -> None:
        if self.existing not in EXISTING:
            raise LohatrainError(f"existing captions: choose one of {', '.join(EXISTING)}, not {self.existing!r}")
        if not self.ext.startswith(".") or "/" in self.ext or "\\" in self.ext:
            raise LohatrainError(f"the caption extension must look like .txt, not {self.ext!r}")


@dataclass
class CaptionStep:
    """One image of a captioning pass: `outcome` is "written", "kept" or "broken"."""

    done: int
    total: int
    file: str
    outcome: str
    caption: str = ""


def _key(tag: str) -> str:
    """Tags compare as people read them: case, underscores and the tagger's bracket escapes aside."""
    return tag.replace("\\", "").replace("_", " ").strip().lower()


def compose(tagged: str, old: str | None, options: CaptionOptions) -> str:
    """The caption to write: the prefix, then (when appending) the old caption's tags, then the tagger's tags,
    without dropped tags or repeats."""
    drop = {_key(t) for t in ds.split_tags(options.drop_tags)}
    base = ds.split_tags(old) if old and options.existing == "append" else []
    tags, seen = [], set()
    for tag in [*ds.split_tags(options.prefix), *base, *ds.split_tags(tagged)]:
        if _key(tag) not in seen and _key(tag) not in drop:
            seen.add(_key(tag))
            tags.append(tag)
    return ", ".join(tags)


def dataset_images(folder: str | Path) -> list[tuple[Path, dict[str, Path], str]]:
    """(image, its folder's files, its name in the dataset) for each image the dataset trains: those directly in
    `folder`, else those of its kohya `N_name` sub-folders ("2_alice/photo.png"). DatasetError for a folder
    without images or with sub-folders that are not `N_name`."""
    given, folder = folder, ds._existing_folder(folder)
    return [(image, sub.files, sub.label(image.name)) for sub in ds.subfolders(folder, given) for image in sub.images]


def caption_folder(folder: str | Path, tag: Callable[[Image.Image], str], options: CaptionOptions,
                   should_stop: Callable[[], bool] = lambda: False) -> Iterator[CaptionStep]:
    """Caption each image of the dataset (`dataset_images`), one step per image. `should_stop` is asked before
    each image, so an Interrupt stops within one. Each file is written whole or not at all."""
    options.validate()
    images = dataset_images(folder)
    for done, (image_path, files, name) in enumerate(images, 1):
        if should_stop():
            return
        existing = ds.caption_file(image_path, files, options.ext)
        old = read_caption(existing) if existing else None
        if old is not None and options.existing == "keep":
            yield CaptionStep(done, len(images), name, "kept", old)
            continue
        try:
            with ds.load_image(image_path) as image:
                text = compose(tag(image), old, options)
        except ds.DatasetError:
            yield CaptionStep(done, len(images), name, "broken")
            continue
        target = existing or image_path.parent / (image_path.stem + options.ext)
        write_atomically(target, text.encode("utf-8"), overwrite=True)
        yield CaptionStep(done, len(images), name, "written", text)


def read_caption(path: Path) -> str | None:
    """A caption file's text on one line; None when it is gone or not UTF-8 (the doctor names those)."""
    try:
        return ds.one_line(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError):
        return None


def thumbnails(folder: str | Path, ext: str, limit: int = 200) -> list[tuple[str, str]]:
    """(image path, its caption file's text or "(no caption)") for the first `limit` images of the dataset
    (`dataset_images`), by sub-folder and name; none when the dataset has none."""
    try:
        images = dataset_images(folder)
    except ds.DatasetError:
        ds._existing_folder(folder)  # a folder that is not there is still said; an empty one shows nothing
        return []
    shown = []
    for image_path, files, _ in images[:limit]:
        existing = ds.caption_file(image_path, files, ext)
        text = read_caption(existing) if existing else None
        shown.append((str(image_path), text if text else NO_CAPTION))
    return shown


def save_caption(folder: str | Path, image_name: str, text: str, ext: str) -> Path:
    """Write one image's caption as edited by hand; `image_name` is its name in the dataset (`dataset_images`)."""
    CaptionOptions(ext=ext).validate()
    try:
        images = dataset_images(folder)
    except ds.DatasetError:
        images = []
    found = next(((path, files) for path, files, name in images if name == image_name), None)
    if found is None:
        raise LohatrainError(f"{image_name!r} is not an image in {folder}; choose a thumbnail first")
    image_path, files = found
    target = ds.caption_file(image_path, files, ext) or image_path.parent / (image_path.stem + ext)
    write_atomically(target, ds.one_line(text).encode("utf-8"), overwrite=True)
    return target
