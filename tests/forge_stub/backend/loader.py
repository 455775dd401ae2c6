"""Forge's loader (backend/loader.py `forge_loader`, run under `torch.inference_mode`), for the tiny test models.

`forge_loader(kind, seed)` builds the tiny ldm/sgm model of lohatrain.demo for "sd1", "sd2" (768-v) or "sdxl" and
gives it Forge's shape: the UNet rebuilt under `using_forge_operations` with Forge's blocks and the tiny model's
weights, text encoders and VAE copied, all inside `torch.inference_mode` (every parameter and buffer an inference
tensor, as in Forge), the UNet in a `UnetPatcher` over a `KModel` with the schedule's `Prediction`. Nothing is on
the "GPU" until the memory manager loads it.
Ports backend/loader.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import copy

import torch

from backend import memory_management
from backend.diffusion_engine.base import CLIP, VAE, ForgeObjects, StableDiffusion, StableDiffusionXL
from backend.modules.k_prediction import Prediction
from backend.nn.unet import as_forge_unet
from backend.operations import using_forge_operations
from backend.patcher.base import ModelPatcher
from backend.patcher.unet import UnetPatcher


def unet_config(unet) -> dict:
    """The layout ComfyUI's key map reads (`num_res_blocks`, `channel_mult`, transformer depths per block)."""
    def depth(block):
        transformers = [m for m in block if type(m).__name__ == "SpatialTransformer"]
        return len(transformers[0].transformer_blocks) if transformers else 0

    res_blocks, depths, levels = [], [], 0
    count = 0
    for block in list(unet.input_blocks)[1:]:
        if type(block[0]).__name__ == "Downsample":
            res_blocks.append(count)
            count = 0
            continue
        count += 1
        depths.append(depth(block))
    res_blocks.append(count)
    channel_mult = [1] * len(res_blocks)  # only the number of levels matters to the key map
    return {"num_res_blocks": res_blocks, "channel_mult": channel_mult, "transformer_depth": depths,
            "transformer_depth_output": [depth(b) for b in reversed(list(unet.output_blocks))],
            "transformer_depth_middle": depth(unet.middle_block)}


def _tiny(kind: str, seed: int):
    """The tiny model and a builder of its UNet alone (the same config)."""
    from ldm.util import instantiate_from_config
    from lohatrain.demo import TINY_SD1_CONFIG, TINY_SD2_CONFIG, build_tiny_sd1, build_tiny_sd2
    from lohatrain.demo_sdxl import TINY_SDXL, build_tiny_sdxl, build_unet

    if kind == "sdxl":
        return build_tiny_sdxl(seed), lambda: build_unet(TINY_SDXL)
    model, config = (build_tiny_sd1(seed), TINY_SD1_CONFIG) if kind == "sd1" else (build_tiny_sd2(seed), TINY_SD2_CONFIG)
    return model, lambda: instantiate_from_config(config["unet_config"])


@torch.inference_mode()
def forge_loader(kind: str = "sd1", seed: int = 0):
    tiny, build_unet = _tiny(kind, seed)
    with using_forge_operations():
        unet = build_unet()
    unet = as_forge_unet(unet, unet_config(unet))
    unet.load_state_dict(tiny.model.diffusion_model.state_dict())
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device, unet.offload_device = memory_management.gpu, memory_management.cpu
    unet.initial_device = memory_management.cpu
    prediction = "v_prediction" if getattr(tiny, "parameterization", "eps") == "v" else "epsilon"
    unet_patcher = UnetPatcher.from_model(unet, Prediction(prediction))
    text = copy.deepcopy(tiny.conditioner if kind == "sdxl" else tiny.cond_stage_model)
    vae_model = copy.deepcopy(tiny.first_stage_model)
    clip = CLIP(text, ModelPatcher(text, memory_management.gpu, memory_management.cpu))
    vae = VAE(vae_model, ModelPatcher(vae_model, memory_management.gpu, memory_management.cpu), tiny.scale_factor)
    objects = ForgeObjects(unet_patcher, clip, vae)
    if kind == "sdxl":
        size_embedder = copy.deepcopy(tiny.conditioner.embedders[2])  # Forge's Timestep(256): one number each
        engine = StableDiffusionXL(objects, lambda t: size_embedder(t[:, None]))
        engine.is_sdxl = True
    else:
        engine = StableDiffusion(objects)
        engine.is_sd1, engine.is_sd2 = kind == "sd1", kind == "sd2"
    return engine
