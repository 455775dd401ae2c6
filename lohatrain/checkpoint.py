"""Train from a checkpoint file outside the WebUI: read it safely, tell what it is from its keys as the WebUI
does (`modules/sd_models_config.py`), build its model (lohatrain.model_configs), load its weights in the run's
precision, and run attention through SDPA (lohatrain.sdpa), as the WebUI would hold the same file.

Single-file checkpoints in the original layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*` or `conditioner.*`): `.safetensors`, or a pickle (`.ckpt`) read weights-only, so a
checkpoint cannot run code.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import model_configs
from .errors import LohatrainError
from .families import BY_NAME, EXTRA_INPUTS, FLUX, REFINER, SD3, UNCLIP, detect
from .precision import COMPUTE_DTYPES
from .sdpa import use_sdpa

UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
# The WebUI's key renames on reading (sd_models.get_state_dict_from_checkpoint): the CLIP layout of old
# transformers versions, and SD 2.1 Turbo saved in sgm's layout.
_OLD_CLIP = {f"cond_stage_model.transformer.{part}.": f"cond_stage_model.transformer.text_model.{part}."
             for part in ("embeddings", "encoder", "final_layer_norm")}
_SD2_TURBO = {"conditioner.embedders.0.": "cond_stage_model."}


@dataclass
class Checkpoint:
    """A checkpoint file's weights (keys as the WebUI renames them) and the family they are."""

    path: Path
    weights: dict[str, torch.Tensor]
    family: str

    @property
    def config_file(self) -> Path:
        """Where a config beside the file would be (the WebUI's rule: same name, .yaml)."""
        return self.path.with_suffix(".yaml")


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint, or say in one line why it cannot be trained: missing, damaged, or of a kind lohatrain
    does not train (named)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LohatrainError(f"checkpoint {path} {'is a folder' if path.is_dir() else 'does not exist'}")
    weights = _rename(_read(path))
    reason = unsupported_reason(weights)
    if reason:
        raise LohatrainError(f"lohatrain cannot train on {path.name}: it is {reason}. Use a Stable Diffusion 1.x, "
                             "2.x or SDXL base checkpoint (or a model fine-tuned or merged from one).")
    return Checkpoint(path, weights, _family(weights))


def load_model(checkpoint: Checkpoint, dtype: str, device: str | torch.device) -> tuple[nn.Module, str]:
    """The model of `checkpoint` with its weights in `dtype` ("fp16", "bf16", "fp32") on `device`, and where its
    config came from. The weights are handed over to the model (`checkpoint.weights` is emptied)."""
    built_in = not checkpoint.config_file.is_file()
    if built_in:
        config, source = model_configs.BUILT_IN[checkpoint.family], f"the built-in {checkpoint.family} config"
    else:
        config, source = model_configs.read_yaml(checkpoint.config_file), checkpoint.config_file.name
    try:
        with _parameters_on_meta():
            model = model_configs.build(config, checkpoint.weights)
    except model_configs.OtherSizes as e:
        raise _other_sizes(checkpoint, str(e)) from None
    except LohatrainError as e:
        if built_in:
            raise
        raise LohatrainError(f"{source}: {e}") from None
    _assign_weights(model, checkpoint, COMPUTE_DTYPES[dtype])
    family = detect(model)  # what cannot be trained, now by the built model (as the tab checks it)
    model.is_sd1, model.is_sd2, model.is_sdxl = (family.name == name for name in ("sd1", "sd2", "sdxl"))
    model.to(device).eval()
    # How the WebUI chooses v2-inference-v.yaml over v2-inference.yaml: they differ in the parameterization alone
    # (and an unused image size), the one thing of the two that training reads.
    if family.name == "sd2" and built_in:
        model.parameterization = "v" if predicts_v(model.model.diffusion_model) else "eps"
        source += f" ({model.parameterization}-prediction, found as the WebUI finds it)"
    use_sdpa(model)
    return model, source


def file_sha256(path: Path) -> str:
    """The whole file's sha256, as the WebUI records a checkpoint's hash (`sd_checkpoint_info.sha256`)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unsupported_reason(weights: dict) -> str | None:
    """What kind of checkpoint the keys say it is when lohatrain cannot train that kind (the tab's refusals,
    told from the file before anything is built), or None."""
    if any(k.startswith(("lora_", "lycoris_")) or ".hada_w1_a" in k or ".lokr_w1" in k for k in weights):
        return "a LoRA or LyCORIS network file, not a model checkpoint"
    if "model.diffusion_model.x_embedder.proj.weight" in weights:
        return SD3
    if any("double_blocks." in k for k in weights):
        return FLUX
    if UNET_INPUT not in weights:
        return ("not a Stable Diffusion checkpoint in the original single-file layout (it has no "
                f"{UNET_INPUT}; a diffusers folder or a UNet alone cannot be trained from)")
    extra_inputs = EXTRA_INPUTS.get(weights[UNET_INPUT].shape[1])
    if "conditioner.embedders.1.model.ln_final.weight" in weights:
        if "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in weights:
            return "SSD-1B (a distilled SDXL without some of the UNet's blocks)"
        return extra_inputs
    if "conditioner.embedders.0.model.ln_final.weight" in weights:
        return REFINER
    if any(k.startswith("depth_model.") for k in weights):
        return EXTRA_INPUTS[5]
    if "embedder.model.ln_final.weight" in weights:
        return UNCLIP
    if extra_inputs:
        return extra_inputs
    if "cond_stage_model.roberta.embeddings.word_embeddings.weight" in weights:
        return "AltDiffusion (an XLM-RoBERTa text encoder that lohatrain does not build)"
    return None


@torch.no_grad()
def predicts_v(unet: nn.Module) -> bool:
    """The WebUI's test for an SD 2.x checkpoint without a config (`is_using_v_parameterization_for_sd2`): at
    the last timestep, on a grey latent and a constant context, a v-predicting UNet's output lies far below its
    input and an eps-predicting one's does not. Run in float32 (CPU torch has no fp16 convolutions)."""
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    unet.float()
    try:
        x = torch.full((1, unet.in_channels, 8, 8), 0.5, device=device)
        context = torch.full((1, 2, unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features), 0.5,
                             device=device)
        out = unet(x, torch.tensor([999], device=device), context=context)
        return (out - x).mean().item() < -1
    finally:
        unet.to(dtype)


def _read(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, zipfile and pickle raise many types for a damaged file
        detail = " ".join(str(e).split())[:300]
        if "weights_only" in detail or "Unsupported global" in detail:
            raise LohatrainError(f"{path.name} holds more than weights (Python objects that loading would have to "
                                 "run), so it is not loaded: convert it to .safetensors") from None
        raise LohatrainError(f"{path.name} cannot be read: the file is damaged, cut short or not a checkpoint "
                             f"({type(e).__name__}: {detail})") from None
    weights = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(weights, dict) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        raise LohatrainError(f"{path.name} holds no weights (a pickle of something else)")
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _rename(weights: dict) -> dict:
    turbo = weights.get("conditioner.embedders.0.model.ln_final.weight")
    renames = _SD2_TURBO if turbo is not None and turbo.shape[0] == 1024 else _OLD_CLIP
    renamed = {}
    for key, value in weights.items():
        old = next((o for o in renames if key.startswith(o)), None)
        renamed[renames[old] + key[len(old):] if old else key] = value
    return renamed


def _family(weights: dict) -> str:
    if "conditioner.embedders.1.model.ln_final.weight" in weights:
        return "sdxl"
    return "sd2" if "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in weights else "sd1"


def _other_sizes(checkpoint: Checkpoint, detail: str) -> LohatrainError:
    name, config = checkpoint.path.name, checkpoint.config_file.name
    if checkpoint.config_file.is_file():
        return LohatrainError(f"{name} does not fit its config {config} ({detail})")
    return LohatrainError(f"{name} is not of the sizes of a {BY_NAME[checkpoint.family].label} base model "
                          f"({detail}): a model of other sizes needs its config beside it, as {config}")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device: no memory and no initialisation (the
    checkpoint's weights are assigned next). Buffers stay real and are computed as usual (noise schedules,
    attention masks, position ids). For this process's model building only: the class is put back on exit."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _assign_weights(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """The file's tensors become the model's: parameters in `dtype`, floating buffers (the noise schedule) in
    float32, as the WebUI keeps `alphas_cumprod`; keys the model does not have (an EMA copy…) are left out."""
    name, weights = checkpoint.path.name, checkpoint.weights
    own = model.state_dict()
    parameters = dict(model.named_parameters())
    missing = [k for k in parameters if k not in weights]
    if missing:
        raise LohatrainError(f"{name} lacks {len(missing)} of its {BY_NAME[checkpoint.family].label} model's "
                             f"weights (such as {missing[0]}): it is not a complete checkpoint")
    for key, tensor in own.items():
        if key in weights and weights[key].shape != tensor.shape:
            raise _other_sizes(checkpoint, f"its {key} is {tuple(weights[key].shape)}, the model's "
                                           f"{tuple(tensor.shape)}")
    state = {}
    for key in own:
        if key in weights:
            tensor = weights.pop(key)
            if tensor.is_floating_point() and not own[key].is_floating_point():
                continue  # position ids some merges saved as floats: the model's own are exact
            # Always a fresh copy: a tensor read from a file may start at any 8-byte offset, and CPU kernels round
            # the last bits differently on such data than on the allocator's aligned memory; one tensor at a
            # time, so the copy costs no more memory than the largest weight.
            state[key] = tensor.to(dtype if key in parameters else
                                   torch.float32 if tensor.is_floating_point() else tensor.dtype, copy=True)
    weights.clear()
    model.load_state_dict(state, strict=False, assign=True)
