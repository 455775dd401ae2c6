"""Forge's model object (backend/diffusion_engine/{base,sd15,sd20,sdxl}.py): `shared.sd_model` in Forge 2.

`ForgeDiffusionEngine` is not an `nn.Module` and has no `model`, `alphas_cumprod` or `parameterization`;
`first_stage_model` and `cond_stage_model` are None (its webui-compatibility fields). Its parts are in
`forge_objects` (`unet`: a UnetPatcher, `clip`, `vae`); `forge_objects_original` holds the patchers without LoRA
patches. `get_learned_conditioning` and `encode_first_stage` load their part through the memory manager and run
under `torch.inference_mode` (their outputs are inference tensors); `encode_first_stage` samples the VAE's posterior
and applies the latent scale (`get_first_stage_encoding` is the identity), `decode_first_stage` undoes it and decodes
(images in [-1, 1]). CLIP skip is `set_clip_skip(n)`; SDXL's
vector is the pooled text embedding then `embedder` (Forge's `Timestep(256)`; the tiny model's width) of height,
width, crop top, crop left, target height, target width. Textual inversion, emphasis and chunking are left out.
Ports backend/diffusion_engine/base.py, sd15.py, sd20.py, sdxl.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import torch

from backend import memory_management


class ForgeObjects:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae)


class CLIP:
    """backend/patcher/clip.py: the text encoders (`cond_stage_model`) and their patcher; a clone shares the
    encoders with a clone of the patcher (LoRA patches of its own, merged when the patcher is loaded)."""

    def __init__(self, cond_stage_model, patcher):
        self.cond_stage_model, self.patcher = cond_stage_model, patcher

    def clone(self):
        return CLIP(self.cond_stage_model, self.patcher.clone())

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)


class VAE:
    """backend/patcher/vae.py: the autoencoder (`first_stage_model`) and its patcher."""

    def __init__(self, first_stage_model, patcher, scale_factor):
        self.first_stage_model, self.patcher, self.scale_factor = first_stage_model, patcher, scale_factor
        self.latent_channels = first_stage_model.embed_dim

    def encode(self, pixels):
        memory_management.load_model_gpu(self.patcher)
        return self.first_stage_model.encode(pixels.movedim(-1, 1) * 2.0 - 1.0).sample()

    def decode(self, samples):
        """Latents to pixels in [0, 1], channels last (decode_inner: the VAE loaded with room for the decode)."""
        memory_management.load_models_gpu([self.patcher], memory_required=samples.numel() * samples.element_size() * 64)
        decoded = self.first_stage_model.decode(samples)
        return torch.clamp((decoded.float() + 1.0) / 2.0, min=0.0, max=1.0).movedim(1, -1)


class ForgeDiffusionEngine:
    def __init__(self, forge_objects):
        self.forge_objects = forge_objects
        self.forge_objects_original = forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.first_stage_model = self.cond_stage_model = None
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False

    def get_first_stage_encoding(self, x):
        return x

    @torch.inference_mode()
    def encode_first_stage(self, x):
        vae = self.forge_objects.vae
        return (vae.scale_factor * vae.encode(x.movedim(1, -1) * 0.5 + 0.5)).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x):
        vae = self.forge_objects.vae
        return (vae.decode(x / vae.scale_factor).movedim(-1, 1) * 2.0 - 1.0).to(x)


class TextProcessingEngine:
    """backend/text_processing/classic_engine.py, for its CLIP-skip field only."""

    def __init__(self, clip_skip):
        self.clip_skip = clip_skip


class StableDiffusion(ForgeDiffusionEngine):
    """sd15.py (and sd20.py, with `is_sd2`): one CLIP; CLIP skip picks the hidden layer."""

    def __init__(self, forge_objects):
        super().__init__(forge_objects)
        self.text_processing_engine = TextProcessingEngine(1)

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        encoder = self.forge_objects.clip.cond_stage_model
        saved = encoder.layer, encoder.layer_idx
        skip = self.text_processing_engine.clip_skip
        if skip > 1 and encoder.layer in ("last", "hidden"):  # SD2's OpenCLIP: its configured layer
            encoder.layer, encoder.layer_idx = "hidden", -skip
        try:
            return encoder.encode(list(prompt))
        finally:
            encoder.layer, encoder.layer_idx = saved


class StableDiffusionXL(ForgeDiffusionEngine):
    """sdxl.py: CLIP-L and bigG side by side (penultimate layers: Forge's minimal CLIP skip 2 for both; the
    stand-in does not go deeper)."""

    def __init__(self, forge_objects, embedder, crop=(0, 0)):
        super().__init__(forge_objects)
        self.embedder, self.crop = embedder, crop
        self.text_processing_engine_l = TextProcessingEngine(2)
        self.text_processing_engine_g = TextProcessingEngine(2)

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        l_encoder, g_encoder = self.forge_objects.clip.cond_stage_model.embedders[:2]
        cond_l = l_encoder(list(prompt))
        cond_g, pooled = g_encoder(list(prompt))
        width = getattr(prompt, "width", 1024) or 1024
        height = getattr(prompt, "height", 1024) or 1024
        numbers = [height, width, self.crop[0], self.crop[1], height, width]
        flat = torch.cat([self.embedder(torch.Tensor([n])) for n in numbers]).flatten()
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2),
                "vector": torch.cat([pooled, flat[None].repeat(pooled.shape[0], 1).to(pooled)], dim=1)}
