"""Every check that can refuse a run before anything starts, in one place: the tab, the REST routes, the job
and the command line call it, so a run is refused the same way wherever it comes from (the host adapter adds
its own: memory flags and the path rule).

What it checks: this torch, the model's family (and what cannot be trained), how the model is held (fp16,
bf16, FP8) against the train format, settings that need a particular model (zero-terminal SNR), the output
name and folder (a plain name, writable, no file overwritten unless asked), and the dataset (images that
open, captions present). What it found is what the run then uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import dataset as ds
from .compat import torch_too_old
from .errors import LohatrainError
from .families import detect
from .output import OutputPlan, plan_output
from .precision import COMPUTE_DTYPES, check_precision
from .settings import TrainSettings


@dataclass
class Checked:
    """What a run starts from once everything is checked."""

    family: object
    plan: OutputPlan
    items: list[ds.ImageItem]


def preflight(model, settings: TrainSettings, output_dir: str | Path, resuming: bool = False) -> Checked:
    """Raise the first problem as a LohatrainError (settings and dataset errors list all of theirs)."""
    settings.validate()
    problem = torch_too_old()
    if problem:
        raise LohatrainError(problem)
    family = detect(model)
    if settings.text_encoder_lr > 0 and family.text_training_refusal:
        raise LohatrainError(family.text_training_refusal)
    if settings.zero_terminal_snr and not family.v_prediction(model):
        raise LohatrainError(
            "zero_terminal_snr needs a v-prediction model (such as SD 2.x 768-v): at the last timestep a "
            "zero-SNR schedule leaves no trace of the image, which a noise-predicting (eps) model cannot "
            "learn from. Turn zero_terminal_snr off for this checkpoint.")
    unet = family.unet(model)
    check_precision(unet, next(unet.parameters()).device, COMPUTE_DTYPES[settings.train_dtype])
    plan = plan_output(settings, output_dir, resuming)
    items = ds.scan_dataset(settings.dataset_dir, settings.caption_mode, settings.caption_phrase,
                            settings.caption_ext)
    return Checked(family, plan, items)
