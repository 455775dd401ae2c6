"""The steps × strength grid of a finished run: its columns (no LoRA, then each saved file by step), its rows
(strengths) and where the picture goes. The host adapter renders the cells with the WebUI's own txt2img.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .errors import LohatrainError
from .settings import TrainSettings, check_file_name

DEFAULT_STRENGTHS = (0.5, 0.75, 1.0)
MAX_CELLS = 120  # per prompt: a bigger grid takes minutes on a consumer GPU and is unreadable anyway


@dataclass(frozen=True)
class Column:
    label: str
    network: str | None  # the file's name without .safetensors (`<lora:network:strength>`); None: without LoRA


@dataclass(frozen=True)
class GridPlan:
    name: str
    columns: list[Column]
    strengths: list[float]
    prompts: list[str]
    seed: int
    settings: TrainSettings  # the run's own: size, preview sampler and steps

    @property
    def cells(self) -> int:
        """Images to render: the no-LoRA column once per prompt, every other cell once."""
        return len(self.prompts) * (1 + (len(self.columns) - 1) * len(self.strengths))

    def file(self, folder: Path, index: int) -> Path:
        return folder / (f"{self.name}.grid.png" if index == 0 else f"{self.name}.grid-{index + 1}.png")


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise LohatrainError(f"{path.name} cannot be read ({e}); train it again") from None


def saved_files(folder: Path, name: str) -> list[tuple[int, str]]:
    """(step, file name without extension) of the run's intermediate saves and its final file, by step.
    A file counts only when its metadata names this run, so "name-2.safetensors" of another LoRA does not."""
    pattern = re.compile(rf"{re.escape(name)}(-\d+)?\.safetensors")
    found = []
    for path in folder.glob(f"{glob_escape(name)}*.safetensors"):
        if not pattern.fullmatch(path.name):
            continue
        meta = _metadata(path)
        if meta.get("ss_output_name") == name and meta.get("ss_steps", "").isdigit():
            found.append((int(meta["ss_steps"]), path.stem))
    return sorted(set(found), key=lambda sn: (sn[0], sn[1] != name))


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def plan(folder: Path, name: str, prompts: list[str] | None = None, strengths: list[float] | None = None,
         seed: int | None = None) -> GridPlan:
    """Check the request against the run's files; prompts default to the run's preview prompts, else its
    trigger phrase; the seed to its preview seed."""
    problem = check_file_name(name or "")
    if problem:
        raise LohatrainError(problem)
    files = saved_files(folder, name)
    if not files:
        raise LohatrainError(f"no trained file named {name}.safetensors (or its intermediate saves) in {folder}: "
                             "train it first, or check the name")
    settings = _run_settings(folder / f"{files[-1][1]}.safetensors")
    strengths = list(DEFAULT_STRENGTHS if not strengths else strengths)
    if any(not isinstance(s, (int, float)) or isinstance(s, bool) or not -4 <= s <= 4 for s in strengths):
        raise LohatrainError("strengths must be numbers between -4 and 4, such as 0.5, 0.75, 1")
    prompts = [p.strip() for p in (prompts or []) if p.strip()] or [
        p for p in settings.preview_prompts if p.strip()] or [settings.caption_phrase or name]
    last_by_step = {}
    for step, stem in files:  # the final file wins over an intermediate save of the same step
        last_by_step.setdefault(step, stem)
    columns = [Column("No LoRA", None)] + [Column(f"Step {step}", stem) for step, stem in sorted(last_by_step.items())]
    chosen = GridPlan(name, columns, [float(s) for s in strengths], prompts,
                      settings.preview_seed if seed is None else int(seed), settings)
    if (len(columns) - 1) * len(strengths) + 1 > MAX_CELLS:
        raise LohatrainError(f"a grid of {len(columns) - 1} saved files × {len(strengths)} strengths is more than "
                             f"{MAX_CELLS} images per prompt: use fewer strengths, or save less often")
    return chosen


def _run_settings(path: Path) -> TrainSettings:
    """The settings the file was trained with (its `lohatrain_settings` metadata); defaults for a file
    lohatrain did not write."""
    raw = _metadata(path).get("lohatrain_settings")
    if not raw:
        return TrainSettings()
    data = json.loads(raw)
    known = {k: v for k, v in data.items() if k in TrainSettings.__dataclass_fields__}
    return TrainSettings(**known)
