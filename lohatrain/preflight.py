"""Every check that can refuse a run before anything starts, in one place: the tab, the REST routes, the job
and the command line call it, so a run is refused the same way wherever it comes from (the host adapter adds
its own: memory flags and the path rule).

What it checks: this torch, what the host allows (a text encoder it cannot train), how the model is held (fp16,
bf16, FP8) against the train format, settings that need a particular model (zero-terminal SNR, block weights for
the family's blocks), the optimizer (its package, its arguments against its constructor, bitsandbytes on the
training device), the output name and folder (a plain name, writable, no file overwritten unless asked), and the
dataset and regularization folders (images that open, captions present, kohya's `N_name` sub-folders, masks that
fit). What it found is what the run then uses.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import dataset as ds
from . import optimizers
from .compat import torch_too_old
from .errors import LohatrainError
from .output import OutputPlan, plan_output
from .parts import ModelParts
from .precision import COMPUTE_DTYPES, check_precision
from .settings import TrainSettings
from .targets import block_weights


@dataclass
class Prepared:
    """What a run starts from once everything is checked: the caller hands it to the trainer, which checks
    nothing again (one Train click, one check and one dataset scan)."""

    settings: TrainSettings
    plan: OutputPlan
    items: list[ds.ImageItem]  # the training images, then the regularization images


def preflight(parts: ModelParts, settings: TrainSettings, resuming: bool = False) -> Prepared:
    """Raise the first problem as a LohatrainError (settings and dataset errors list all of theirs). The output
    goes to `settings.output_dir` (the current folder when it is empty)."""
    _check_settings(settings)
    check_model(parts, settings)
    return _prepared(settings, resuming)


def prepare(settings: TrainSettings, resuming: bool = False) -> Prepared:
    """The checks that need no model, for a host whose model is loaded only when the run starts (Forge); the run
    then calls `check_model` on it."""
    _check_settings(settings)
    return _prepared(settings, resuming)


def _check_settings(settings: TrainSettings) -> None:
    settings.validate()
    problem = torch_too_old()
    if problem:
        raise LohatrainError(problem)
    optimizers.check(settings)


def _prepared(settings: TrainSettings, resuming: bool) -> Prepared:
    plan = plan_output(settings, settings.output_dir or ".", resuming)
    items = ds.scan_dataset(settings.dataset_dir, settings.caption_mode, settings.caption_phrase,
                            settings.caption_ext, settings.reg_data_dir, settings.masked_loss)
    return Prepared(settings, plan, items)


def check_model(parts: ModelParts, settings: TrainSettings) -> None:
    """What the loaded model and host allow of these settings (cheap: nothing is scanned or moved). A host that
    loads the model only when the run starts (Forge) calls this again then."""
    if settings.text_encoder_lr > 0 and parts.text_training_refusal:
        raise LohatrainError(parts.text_training_refusal)
    if settings.zero_terminal_snr and not parts.v_prediction:
        raise LohatrainError(
            "zero_terminal_snr needs a v-prediction model (such as SD 2.x 768-v): at the last timestep a "
            "zero-SNR schedule leaves no trace of the image, which a noise-predicting (eps) model cannot "
            "learn from. Turn zero_terminal_snr off for this checkpoint.")
    _check_block_weights(parts, settings)
    if settings.max_timestep > len(parts.alphas_cumprod):
        raise LohatrainError(f"max_timestep is {settings.max_timestep} but this model's noise schedule has "
                             f"{len(parts.alphas_cumprod)} timesteps: lower max_timestep")
    device = next(parts.unet.parameters()).device
    check_precision(parts.unet, device, COMPUTE_DTYPES[settings.train_dtype])
    optimizers.check_device(settings, device)


def _check_block_weights(parts: ModelParts, settings: TrainSettings) -> None:
    """kohya's block weights against the family's blocks (SDXL has fewer than SD 1.x); all of them 0 trains nothing."""
    try:
        weights = block_weights(settings, parts.family.lr_blocks)
    except ValueError as e:
        raise LohatrainError(f"{e} ({parts.family.label}: {parts.family.lr_blocks['down']} down, "
                             f"{parts.family.lr_blocks['mid']} middle and {parts.family.lr_blocks['up']} up blocks)"
                             ) from None
    if weights and not any(weights.values()) and settings.network_targets != "full" and not settings.text_encoder_lr:
        raise LohatrainError("every block's learning-rate weight is 0 (down_lr_weight, mid_lr_weight, up_lr_weight): "
                             "nothing would be trained. Give some block a weight above 0 (and above "
                             "block_lr_zero_threshold).")
