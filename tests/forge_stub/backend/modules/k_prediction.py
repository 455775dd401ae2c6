"""Forge's noise schedule (backend/modules/k_prediction.py, `Prediction`): SD's "scaled linear" betas, the
checkpoint's `alphas_cumprod`, the `sigmas` samplers use, and the prediction type ('epsilon' or 'v_prediction').
Forge keeps the schedule here only: its model object has no `alphas_cumprod` or `parameterization`.

Ports backend/modules/k_prediction.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import torch


class Prediction(torch.nn.Module):
    def __init__(self, prediction_type="epsilon", linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        self.sigma_data = 1.0
        self.prediction_type = prediction_type
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def calculate_input(self, sigma, noise):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))
        return noise / (sigma ** 2 + self.sigma_data ** 2) ** 0.5

    def calculate_denoised(self, sigma, model_output, model_input):
        sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
        if self.prediction_type == "v_prediction":
            return (model_input * self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
                    - model_output * sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5)
        return model_input - model_output * sigma

    def sigma(self, timestep):
        """The sigma at a (fractional) timestep, interpolated in log space (what samplers' schedules use)."""
        t = torch.clamp(timestep.float(), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def timestep(self, sigma):
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)
