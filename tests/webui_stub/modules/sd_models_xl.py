"""What the host adds to an SDXL model (sgm's DiffusionEngine) so the rest of it can treat it like SD1.

Kept, as the host:
- `get_learned_conditioning(batch)`: sgm's conditioner on {"txt": prompts, original and target size (height,
  width) from the prompt list's `.width` / `.height` (an `SdConditioning`; a plain list, or None there, means
  1024), crop top-left from `opts.sdxl_crop_top/left`, aesthetic score}; an all-empty NEGATIVE prompt list
  gets zero text embeddings (`force_zero_embeddings=['txt']`). Returns {"crossattn", "vector"}.
- `apply_model(x, t, cond)`: `self.model(x, t, cond)` (inpainting: with cond['c_concat'] in front).
- `get_first_stage_encoding(x)`: x (sgm's encode_first_stage already samples and scales).
- `extend_sdxl(model)`: `diffusion_model.dtype`, `model.model.conditioning_key`, `cond_stage_key`, the
  parameterization, `alphas_cumprod` of sgm's LegacyDDPMDiscretization (float32), and
  `model.conditioner.wrapped = torch.nn.Module()` (an empty module, so code that reads
  `cond_stage_model.wrapped` finds something).
Stand-in difference: the host sets the three methods on sgm's DiffusionEngine CLASS at import; the stand-in
binds them on each SDXL model it loads (`extend_sdxl`), so bare SDXL engines built elsewhere in a test session
stay as sgm makes them. The parameterization is the model's own (the host reads it off `model.denoiser`,
which the tiny engine does not have). The GeneralConditioner additions (tokenize, process_texts, ...) are left out.
Ports modules/sd_models_xl.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from __future__ import annotations

import types

import torch

from modules import devices, shared


def get_learned_conditioning(self, batch):
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0

    width = getattr(batch, 'width', 1024) or 1024
    height = getattr(batch, 'height', 1024) or 1024
    is_negative_prompt = getattr(batch, 'is_negative_prompt', False)
    aesthetic_score = (shared.opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt
                       else shared.opts.sdxl_refiner_high_aesthetic_score)

    devices_args = dict(device=devices.device, dtype=devices.dtype)
    sdxl_conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left],
                                             **devices_args).repeat(len(batch), 1),
        "target_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "aesthetic_score": torch.tensor([aesthetic_score], **devices_args).repeat(len(batch), 1),
    }

    force_zero_negative_prompt = is_negative_prompt and all(x == '' for x in batch)
    return self.conditioner(sdxl_conds, force_zero_embeddings=['txt'] if force_zero_negative_prompt else [])


def apply_model(self, x, t, cond):
    if self.is_sdxl_inpaint:
        x = torch.cat([x] + cond['c_concat'], dim=1)
    return self.model(x, t, cond)


def get_first_stage_encoding(self, x):
    return x


def _legacy_ddpm_alphas_cumprod(linear_start=0.00085, linear_end=0.012, num_timesteps=1000):
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
    return (1.0 - betas).cumprod(0)


def extend_sdxl(model):
    dtype = next(model.model.diffusion_model.parameters()).dtype
    model.model.diffusion_model.dtype = dtype
    model.model.conditioning_key = 'crossattn'
    model.cond_stage_key = 'txt'
    # model.cond_stage_model is set in sd_hijack

    model.parameterization = getattr(model, "parameterization", "eps")
    model.alphas_cumprod = torch.asarray(_legacy_ddpm_alphas_cumprod(), device=devices.device, dtype=torch.float32)

    model.conditioner.wrapped = torch.nn.Module()

    for method in (get_learned_conditioning, apply_model, get_first_stage_encoding):
        setattr(model, method.__name__, types.MethodType(method, model))
