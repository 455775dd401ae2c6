"""Forge's sampling glue (backend/sampling/sampling_function.py), for its samplers' calls.

`sampling_prepare(unet, x)` has the memory manager load the UNet patcher the generation samples (which merges its
LoRA patches into the weights, `LoraLoader.refresh`) with room for the sampling itself; `sampling_function` is one
classifier-free-guidance step: the patcher's KModel `apply_model` (sigmas in, denoised latents out) on the
conditional and unconditional conditioning, mixed by `cond_scale`. Conditioning is what the engine's
`get_learned_conditioning` returns: a tensor (`c_crossattn`), or SDXL's {"crossattn", "vector"} (`y` is the vector).
Left out: area and timestep-range conditioning, ControlNet, model-option hooks, batching cond and uncond together.
Ports backend/sampling/sampling_function.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
from backend import memory_management


def _model_conds(cond):
    if isinstance(cond, dict):
        return {"c_crossattn": cond["crossattn"], "y": cond["vector"]}
    return {"c_crossattn": cond}


def sampling_function(unet_patcher, x, sigma, uncond, cond, cond_scale):
    model = unet_patcher.model
    cond_pred = model.apply_model(x, sigma, **_model_conds(cond))
    uncond_pred = model.apply_model(x, sigma, **_model_conds(uncond))
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def sampling_prepare(unet, x):
    inference_memory = 2 * x.numel() * x.element_size() * 1024  # Forge: unet.memory_required([2B, C, H, W])
    memory_management.load_models_gpu(models=[unet], memory_required=inference_memory, hard_memory_preservation=0)


def sampling_cleanup(unet):
    pass
