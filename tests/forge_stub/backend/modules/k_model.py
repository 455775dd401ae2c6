"""Forge's `KModel` (backend/modules/k_model.py): the UNet (`diffusion_model`) with its schedule (`predictor`);
`apply_model` takes sigmas, as Forge's samplers call it.

Ports backend/modules/k_model.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import torch


class KModel(torch.nn.Module):
    def __init__(self, model, predictor):
        super().__init__()
        self.storage_dtype = model.storage_dtype
        self.computation_dtype = model.computation_dtype
        self.diffusion_model = model
        self.predictor = predictor

    def apply_model(self, x, t, c_crossattn=None, y=None, transformer_options={}):
        sigma = t
        xc = self.predictor.calculate_input(sigma, x).to(self.computation_dtype)
        timesteps = self.predictor.timestep(t).float()
        extra = {"y": y.to(self.computation_dtype)} if y is not None else {}
        output = self.diffusion_model(xc, timesteps, context=c_crossattn.to(self.computation_dtype),
                                      transformer_options=transformer_options, **extra).float()
        return self.predictor.calculate_denoised(sigma, output, x)
