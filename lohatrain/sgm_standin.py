"""A faithful stand-in for Stability-AI/generative-models' (`sgm`) SDXL `DiffusionEngine`, of any size: what an
SDXL checkpoint is built as outside the WebUI (lohatrain.model_configs), and the tiny SDXL model (lohatrain.demo_sdxl).

`sgm` is not on the package registries, so its SDXL classes cannot be imported here. What the WebUI holds
for an SDXL checkpoint is rebuilt from ldm's blocks, which are the ones sgm's are derived from (same class
names, same module names, same maths): `ResBlock`, `SpatialTransformer` (linear proj_in/proj_out),
`Downsample`, `Upsample`, `timestep_embedding`. What is new in SDXL is written here, following sgm's code:

- `SDXLUNet`: sgm's `UNetModel` for SDXL's config: 3 levels, no attention on the first, a transformer depth per
  level (SDXL: 2 and 10, middle 10), and the `label_emb.0.{0,2}` MLP that adds the "vector" (`y`) to the time
  embedding; module names `input_blocks.0-8`, `middle_block.0-2`, `output_blocks.0-8`, `out`.
- `GeneralConditioner` with SDXL's five embedders: CLIP-L (`SDXLCLIPEmbedder`, sgm's `FrozenCLIPEmbedder`:
  penultimate hidden state, no final norm), OpenCLIP-bigG (`OpenCLIPEmbedder2`, sgm's `FrozenOpenCLIPEmbedder2`:
  penultimate hidden state and the pooled, projected last one), and three `ConcatTimestepEmbedderND` (original
  size, crop top-left, target size, each number a 256-wide Fourier embedding). Output: `crossattn` (the two hidden states side by side) and `vector`
  (pooled + sizes), as in sgm.
- `SDXLEngine`: `model.diffusion_model` (sgm's `OpenAIWrapper`), `conditioner`, `first_stage_model` (ldm's
  `AutoencoderKL`, SDXL's VAE architecture), `encode_first_stage` (scaled), and what the WebUI adds on load
  (modules/sd_models_xl.py `extend_sdxl`, sd_models.py `set_model_type`): `alphas_cumprod` of the legacy
  DDPM schedule, `parameterization`, `is_sdxl`.

The text encoders are lohatrain.text_encoders' offline ones with sgm's embedder attributes.

`tools/check_sgm_standin.py` compares `SDXLUNet` with sgm's own `UNetModel` (commit 45c443b3, the WebUI's pin)
given a checkout: the same state-dict keys and shapes (2,567,463,684 parameters at full size), the same module
classes, and with the same weights the same output (to 3e-8).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import ldm_importable  # noqa: F401  (first: makes ldm importable)
from .text_encoders import CLIPEmbedder, OpenCLIPEmbedder  # noqa: E402
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.modules.attention import SpatialTransformer as LdmSpatialTransformer  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import (Downsample, ResBlock, TimestepEmbedSequential,  # noqa: E402
                                                      Upsample)
from ldm.modules.diffusionmodules.util import (conv_nd, linear, make_beta_schedule, normalization,  # noqa: E402
                                               timestep_embedding, zero_module)


class SpatialTransformer(LdmSpatialTransformer):
    """ldm's block, except that one context serves every transformer block of a deeper stack (sgm's rule;
    ldm's wants a list with one context per block)."""

    def forward(self, x, context=None):
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        return super().forward(x, context)


class SDXLUNet(nn.Module):
    """sgm's `UNetModel` as SDXL's config builds it (num_classes "sequential", linear transformers,
    per-level transformer depth); `forward(x, timesteps, context, y)` as sgm's."""

    def __init__(self, model_channels: int, channel_mult: tuple[int, ...], transformer_depth: tuple[int, ...],
                 context_dim: int, adm_in_channels: int, num_head_channels: int, num_res_blocks: int = 2,
                 attention_levels: tuple[int, ...] = (1, 2), in_channels: int = 4, out_channels: int = 4,
                 use_checkpoint: bool = True):
        super().__init__()
        self.in_channels, self.model_channels, self.num_res_blocks = in_channels, model_channels, num_res_blocks
        self.num_classes = "sequential"
        ted = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, ted), nn.SiLU(), linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(linear(adm_in_channels, ted), nn.SiLU(), linear(ted, ted)))

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            # ldm's constructor takes one context width per block when given a list.
            return SpatialTransformer(ch, ch // num_head_channels, num_head_channels, depth=depth,
                                      context_dim=[context_dim] * depth, use_linear=True, use_checkpoint=use_checkpoint)

        def resblock(ch: int, out: int) -> ResBlock:
            return ResBlock(ch, ted, 0.0, out_channels=out, use_checkpoint=use_checkpoint)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(2, in_channels, model_channels, 3,
                                                                           padding=1))])
        chans, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers.append(transformer(ch, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, True, out_channels=ch)))
                chans.append(ch)
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch, transformer_depth[-1]),
                                                    resblock(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(transformer(ch, transformer_depth[level]))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch, True, out_channels=ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(2, model_channels, out_channels, 3, padding=1)))

    def forward(self, x, timesteps=None, context=None, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        emb = emb + self.label_emb(y)
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))


class OpenAIWrapper(nn.Module):
    """sgm's wrapper (`model.model`): unpacks the conditioning dict into the UNet's arguments."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c: dict, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class _Embedder:
    """sgm's `AbstractEmbModel` attributes, read by `GeneralConditioner` (and copied by the WebUI's wrappers)."""

    is_trainable = False
    ucg_rate = 0.0
    input_key = "txt"
    legacy_ucg_val = None


class SDXLCLIPEmbedder(_Embedder, CLIPEmbedder):
    """SDXL's CLIP-L: sgm's `FrozenCLIPEmbedder(layer="hidden", layer_idx=<penultimate>)`, whose hidden state
    is taken without the final layer norm."""

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                                return_tensors="pt")["input_ids"].to(self.transformer.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        return outputs.last_hidden_state if self.layer == "last" else outputs.hidden_states[self.layer_idx]


class OpenCLIPEmbedder2(_Embedder, OpenCLIPEmbedder):
    """SDXL's OpenCLIP-bigG: sgm's `FrozenOpenCLIPEmbedder2(layer="penultimate", always_return_pooled=True,
    legacy=False)`. `encode_with_transformer` returns {"last", "penultimate", "pooled"} (the WebUI's wrapper
    reads it so); `forward` returns (penultimate hidden state, pooled)."""

    return_pooled = True
    legacy = False

    def forward(self, text: list[str]):
        tokens = self.tokenize(text).to(self.model.token_embedding.weight.device)
        z = self.encode_with_transformer(tokens)
        return z[self.layer], z["pooled"]

    def encode_with_transformer(self, text: torch.Tensor) -> dict:
        x = self.model.token_embedding(text) + self.model.positional_embedding
        outputs = self.text_transformer_forward(x.permute(1, 0, 2), attn_mask=self.model.attn_mask)
        last = self.model.ln_final(outputs["last"])
        outputs["pooled"] = last[torch.arange(last.shape[0]), text.argmax(dim=-1)] @ self.model.text_projection
        return outputs

    def text_transformer_forward(self, x: torch.Tensor, attn_mask=None) -> dict:
        outputs = {}
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - 1:
                outputs["penultimate"] = x.permute(1, 0, 2)
            x = r(x, attn_mask=attn_mask)
        outputs["last"] = x.permute(1, 0, 2)
        return outputs


class ConcatTimestepEmbedderND(_Embedder, nn.Module):
    """Each number of a (B, d) input as an `outdim`-wide Fourier embedding, concatenated: (B, d·outdim)."""

    def __init__(self, outdim: int, input_key: str):
        super().__init__()
        self.outdim, self.input_key = outdim, input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        b, dims = x.shape
        return timestep_embedding(x.reshape(b * dims), self.outdim).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """sgm's conditioner: every embedder reads its `input_key` of the batch; 3-D outputs are concatenated
    into "crossattn" along the channels, 2-D ones into "vector". Embedders that are not trainable run under
    no_grad (so a text encoder only gets gradients while its `is_trainable` is set)."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)

    def forward(self, batch: dict, force_zero_embeddings: list[str] | None = None) -> dict:
        output: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            with contextlib.nullcontext() if embedder.is_trainable else torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            for emb in emb_out if isinstance(emb_out, (list, tuple)) else [emb_out]:
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in (force_zero_embeddings or []):
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output


SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


class SDXLEngine(nn.Module):
    """sgm's `DiffusionEngine` as the WebUI holds it for an SDXL base checkpoint (without the sampler and
    denoiser objects, which training does not use)."""

    def __init__(self, unet: SDXLUNet, conditioner: GeneralConditioner, vae: AutoencoderKL,
                 scale_factor: float = 0.13025):
        super().__init__()
        self.model = OpenAIWrapper(unet)
        self.conditioner = conditioner
        self.first_stage_model = vae
        self.scale_factor = scale_factor
        # Added by the WebUI on load: the schedule of sgm's LegacyDDPMDiscretization, the prediction type.
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.alphas_cumprod = torch.tensor(betas).neg().add(1).cumprod(0).float()
        self.parameterization = "eps"
        self.is_sdxl, self.is_sd1, self.is_sd2, self.is_sd3, self.is_ssd = True, False, False, False, False

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)
