"""Forge's `UnetPatcher` (backend/patcher/unet.py): the KModel's patcher, `sd_model.forge_objects.unet`.

Ports backend/patcher/unet.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
from backend.modules.k_model import KModel
from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, predictor):
        model = KModel(model, predictor)
        return cls(model, load_device=model.diffusion_model.load_device,
                   offload_device=model.diffusion_model.offload_device,
                   current_device=model.diffusion_model.initial_device)
