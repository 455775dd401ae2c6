"""Tiny, randomly initialised SD1- and SD2-shaped models and a procedural dataset.

They exist so that training, saving and loading can be exercised end to end
without a real checkpoint, a GPU or a network: `build_tiny_sd1` returns the
same kind of object the WebUI holds for an SD1 checkpoint (an ldm
`LatentDiffusion` with SD1's module names), with 11M parameters instead of 1B;
`build_tiny_sd2` the same for SD2.x (v2-inference-v.yaml / v2-inference.yaml),
with an OpenCLIP-shaped text encoder.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib.machinery
import importlib.util
import io
import json
import os
import random
import sys
import tempfile
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

# Imported before the torchvision stand-in below so that their "is torchvision
# installed?" checks (run at import) see the truth, not the stand-in.
import pytorch_lightning  # noqa: F401
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

try:
    import torchvision  # noqa: F401
except ImportError:
    # ldm imports torchvision.utils.make_grid at module top for image logging only;
    # no torchvision wheel loads beside this CPU torch, and training never calls it.
    _tv = types.ModuleType("torchvision")
    _tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    _tv_utils = types.ModuleType("torchvision.utils")
    _tv_utils.__spec__ = importlib.machinery.ModuleSpec("torchvision.utils", None)

    def _make_grid(*args, **kwargs):
        raise NotImplementedError("torchvision is not installed (lohatrain.demo stand-in)")

    _tv_utils.make_grid = _make_grid
    _tv.utils = _tv_utils
    sys.modules["torchvision"] = _tv
    sys.modules["torchvision.utils"] = _tv_utils

from ldm.models.diffusion.ddpm import LatentDiffusion  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table (as in CLIP's simple_tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_bpe_source() -> Path:
    """The BPE merges file shipped in open-clip-torch, found without importing open_clip
    (importing it pulls in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open-clip-torch is needed for its CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    raise RuntimeError("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@functools.lru_cache(maxsize=None)
def clip_tokenizer_files() -> tuple[Path, Path]:
    """Write (once, into a cache folder) the vocab.json and merges.txt of the real CLIP
    tokenizer, derived exactly as CLIP's simple_tokenizer does from the BPE file."""
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache_root / "lohatrain" / "clip-tokenizer"
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if vocab_file.is_file() and merges_file.is_file():
        return vocab_file, merges_file
    folder.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(_clip_bpe_source()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"unexpected CLIP vocabulary size {len(vocab)}")
    _write_atomically(vocab_file, json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    _write_atomically(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


class _SharedCLIPTokenizer(CLIPTokenizer):
    """Nothing a model does changes its tokenizer, which is megabytes of Python dicts: a copy of a tiny model
    shares it instead of copying it (most of the time `copy.deepcopy` of a tiny model took)."""

    def __deepcopy__(self, memo):
        return self


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP ViT-L/14 tokenizer (as in SD1), built offline once per process; pads with <|endoftext|>."""
    vocab_file, merges_file = clip_tokenizer_files()
    return _SharedCLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


class TinyCLIPEmbedder(nn.Module):
    """A tiny stand-in for ldm's `FrozenCLIPEmbedder` with the same attribute names
    (`tokenizer`, `transformer`, `max_length`, `layer`, `layer_idx`), so code that reaches
    into SD1's text encoder finds the same structure. ldm's own class cannot be imported
    here (its module imports open_clip, hence torchvision).

    `layer="hidden"` with `layer_idx=-2` is CLIP skip 2, computed the way the WebUI does:
    that hidden state passed through the final layer norm.
    """

    LAYERS = ("last", "hidden")

    def __init__(self, hidden_size: int = 32, num_layers: int = 3, num_heads: int = 4,
                 intermediate_size: int = 64, max_length: int = CLIP_MAX_LENGTH,
                 layer: str = "last", layer_idx: int | None = None):
        super().__init__()
        assert layer in self.LAYERS
        if layer == "hidden":
            assert layer_idx is not None and 0 < abs(layer_idx) <= num_layers
        self.tokenizer = clip_tokenizer()
        config = CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_length,
            hidden_act="quick_gelu", projection_dim=hidden_size,
            pad_token_id=1, bos_token_id=49406, eos_token_id=49407,  # as in openai/clip-vit-large-patch14
        )
        self.transformer = CLIPTextModel(config).eval()
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text: list[str]) -> torch.Tensor:
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length,
                                        padding="max_length", return_tensors="pt")
        tokens = batch_encoding["input_ids"].to(self.transformer.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        return self.transformer.text_model.final_layer_norm(outputs.hidden_states[self.layer_idx])

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)


TEXT_HIDDEN_SIZE = 32

_LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"

# The `model.params` of SD1's v1-inference.yaml, shrunk.
TINY_SD1_CONFIG = {
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "num_timesteps_cond": 1,
    "log_every_t": 200,
    "timesteps": 1000,
    "first_stage_key": "jpg",
    "cond_stage_key": "txt",
    "image_size": 8,
    "channels": 4,
    "cond_stage_trainable": False,
    "conditioning_key": "crossattn",
    "monitor": "val/loss_simple_ema",
    "scale_factor": 0.18215,
    "use_ema": False,
    "parameterization": "eps",
    "unet_config": {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "attention_resolutions": [4, 2, 1],
            "num_res_blocks": 2,
            "channel_mult": [1, 2, 4, 4],
            "num_heads": 8,
            "use_spatial_transformer": True,
            "transformer_depth": 1,
            "context_dim": TEXT_HIDDEN_SIZE,
            "use_checkpoint": True,
            "legacy": False,
        },
    },
    "first_stage_config": {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 64,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 2, 2, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    },
    "cond_stage_config": {
        "target": f"{__name__}.TinyCLIPEmbedder",
        "params": {"hidden_size": TEXT_HIDDEN_SIZE, "num_layers": 3, "num_heads": 4, "intermediate_size": 64},
    },
}


# Brings the tiny VAE's scaled latents (of the sample images) to a std of about 1.
_LATENT_GAIN = 20.0


def _reinit_degenerate_layers(unet: nn.Module, text_encoders: nn.Module, vae: nn.Module,
                              latent_gain: float = _LATENT_GAIN) -> None:
    """Undo initialisations that make a random model useless for testing training.

    - ldm zero-initialises output layers (SpatialTransformer `proj_out`, ResBlock
      `out_layers.3`, UNet `out.2`); behind a zero layer no gradient reaches anything.
    - A CLIP (or OpenCLIP) with LayerNorm weight 1 / bias 0 produces zero-mean
      embeddings, and the WebUI's emphasis renormalisation divides by that mean.
    - A random VAE's latents are mostly sampling noise (posterior std near 1) and,
      once multiplied by SD1's scale_factor, tiny (std ~0.05). A real SD VAE's
      posterior is nearly deterministic and its scaled latents have std ~1.
    """
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    for module in text_encoders.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.2)
            nn.init.normal_(module.bias, mean=0.1, std=0.2)
    with torch.no_grad():
        vae.quant_conv.weight[: vae.embed_dim] *= latent_gain  # mean half
        vae.quant_conv.bias[: vae.embed_dim] *= latent_gain
        vae.quant_conv.bias[vae.embed_dim :] = -10.0  # logvar half: posterior std ~0.007
        vae.post_quant_conv.weight /= latent_gain


def build_tiny_sd1(seed: int = 0) -> LatentDiffusion:
    """A tiny random SD1 model: ldm `LatentDiffusion` with SD1's UNet layout and
    module names, a tiny `AutoencoderKL` (8x downsampling, 4 latent channels) and a
    tiny CLIP text model behind the real CLIP tokenizer. CPU, float32, eval mode.

    Deterministic for `seed`; the caller's global RNG state is left untouched.
    """
    return _build(TINY_SD1_CONFIG, seed, family="sd1")


def _build(config: dict, seed: int, family: str) -> LatentDiffusion:
    """Instantiate a LatentDiffusion config under a forked, seeded RNG, with the host's `is_*` flags."""
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(seed)
        model = instantiate_from_config(OmegaConf.create({"target": _LATENT_DIFFUSION, "params": config}))
        _reinit_degenerate_layers(model.model.diffusion_model, model.cond_stage_model, model.first_stage_model)
    model.eval()
    model.is_sd1 = family == "sd1"
    model.is_sd2 = family == "sd2"
    model.is_sdxl = False
    return model


class _OpenCLIPResidualAttentionBlock(nn.Module):
    """open_clip 2.20's `ResidualAttentionBlock` (no layer scale, as in ViT-H-14): pre-norm self-attention
    through a fused `nn.MultiheadAttention` (sequence first), then a GELU MLP `c_fc` → `c_proj`."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        mlp_width = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp_width, width))]))

    def attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        return self.attn(x, x, x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.ln_1(x), attn_mask=attn_mask)
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([_OpenCLIPResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for r in self.resblocks:
            x = r(x, attn_mask=attn_mask)
        return x


class _OpenCLIPTextModel(nn.Module):
    """The text half of open_clip 2.20's `CLIP` (ldm deletes `.visual`): the names SD2 checkpoints and the
    WebUI's Lora extension use (`token_embedding`, `positional_embedding`, `transformer.resblocks.N`,
    `ln_final`, `text_projection`, the causal `attn_mask` buffer)."""

    def __init__(self, width: int, layers: int, heads: int, context_length: int = CLIP_MAX_LENGTH,
                 vocab_size: int = CLIP_VOCAB_SIZE):
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.transformer = _OpenCLIPTransformer(width, layers, heads)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, width))
        self.register_buffer("attn_mask", self.build_attention_mask(), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def build_attention_mask(self) -> torch.Tensor:
        """Causal: -inf above the diagonal (open_clip's additive mask)."""
        return torch.empty(self.context_length, self.context_length).fill_(float("-inf")).triu_(1)


class TinyOpenCLIPEmbedder(nn.Module):
    """A tiny stand-in for ldm's `FrozenOpenCLIPEmbedder` (SD2's text encoder), with the same attribute
    names and the same encoding path, so code that reaches into SD2's text encoder finds the same structure.

    It is a stand-in because ldm's own class cannot be imported here: `ldm.modules.encoders.modules`
    imports open_clip, which imports torchvision (no torchvision wheel loads beside this CPU torch).
    Like open_clip 2.20 (the WebUI's pin) the transformer runs sequence-first and its attention is a fused
    `nn.MultiheadAttention`. Tokens come from the real CLIP tokenizer (`clip_tokenizer()`, the same BPE
    vocabulary as `open_clip.tokenize`): `<start> … <end>`, cut to 77, padded with 0 as open_clip pads.

    `layer="last"` (layer_idx 0) or `"penultimate"` (layer_idx 1, what SD2's configs use): the last
    `layer_idx` residual blocks are skipped, then `ln_final` is applied, as in ldm's `encode_with_transformer`.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, width: int = 32, layers: int = 3, heads: int = 4, max_length: int = CLIP_MAX_LENGTH,
                 freeze: bool = True, layer: str = "penultimate"):
        super().__init__()
        assert layer in self.LAYERS
        self.model = _OpenCLIPTextModel(width, layers, heads, context_length=max_length)
        self.max_length = max_length
        self._tokenizer = clip_tokenizer()
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1

    def freeze(self) -> None:
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: list[str]) -> torch.Tensor:
        """What `open_clip.tokenize` returns: (B, 77) ids, `<start>` … `<end>`, zero padding."""
        rows = self._tokenizer(list(text), truncation=True, max_length=self.max_length)["input_ids"]
        tokens = torch.zeros(len(rows), self.max_length, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        return tokens

    def forward(self, text: list[str]) -> torch.Tensor:
        tokens = self.tokenize(text)
        return self.encode_with_transformer(tokens.to(self.model.token_embedding.weight.device))

    def encode_with_transformer(self, text: torch.Tensor) -> torch.Tensor:
        x = self.model.token_embedding(text)  # [batch_size, n_ctx, d_model]
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return self.model.ln_final(x)

    def text_transformer_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, attn_mask=attn_mask)
        return x

    def encode(self, text: list[str]) -> torch.Tensor:
        return self(text)


SD2_TEXT_WIDTH = 48  # not SD1's 32: the UNet's context_dim must follow the text encoder's width

# The `model.params` of SD2's v2-inference-v.yaml (768-v; v2-inference.yaml, the 512 base, differs only in
# predicting eps), shrunk. SD2 uses linear proj_in/proj_out and a fixed head width (64 there, 8 here).
TINY_SD2_CONFIG = {
    **{k: v for k, v in TINY_SD1_CONFIG.items() if k not in ("unet_config", "cond_stage_config")},
    "parameterization": "v",
    "unet_config": {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            **{k: v for k, v in TINY_SD1_CONFIG["unet_config"]["params"].items() if k != "num_heads"},
            "num_head_channels": 8,
            "use_linear_in_transformer": True,
            "context_dim": SD2_TEXT_WIDTH,
        },
    },
    "cond_stage_config": {
        "target": f"{__name__}.TinyOpenCLIPEmbedder",
        "params": {"width": SD2_TEXT_WIDTH, "layers": 3, "heads": 4, "freeze": True, "layer": "penultimate"},
    },
}


def build_tiny_sd2(seed: int = 0, v_prediction: bool = True) -> LatentDiffusion:
    """A tiny random SD2.x model: ldm `LatentDiffusion` with SD2's UNet (SD1's layout, linear
    proj_in/proj_out, fixed head width), a tiny `AutoencoderKL` and a tiny OpenCLIP text encoder
    (`TinyOpenCLIPEmbedder`, penultimate layer) behind the real CLIP tokenizer. `v_prediction` selects the
    768-v model's "v" parameterization; False gives the 512-base model's "eps". CPU, float32, eval mode.

    Deterministic for `seed`; the caller's global RNG state is left untouched.
    """
    config = {**TINY_SD2_CONFIG, "parameterization": "v" if v_prediction else "eps"}
    return _build(config, seed, family="sd2")


_COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
_SHAPES = ("circle", "square", "triangle", "stripes")
_SIZES = ((96, 96), (128, 96), (96, 128), (160, 96), (64, 64), (96, 160), (128, 128), (112, 80))


def make_sample_dataset(folder: Path, seed: int = 0) -> Path:
    """Write 8 small procedural PNGs with same-named booru-style `.txt` captions into
    `folder` (created if needed) and return it: the built-in demo dataset.
    Deterministic for `seed`."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colour_names = list(_COLOURS)
    for index, (width, height) in enumerate(_SIZES):
        shape = _SHAPES[index % len(_SHAPES)]
        fg, bg = rng.sample(colour_names, 2)
        image = Image.new("RGB", (width, height), _COLOURS[bg])
        draw = ImageDraw.Draw(image)
        size = rng.randint(min(width, height) // 2, min(width, height) * 4 // 5)
        left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        box = (left, top, left + size, top + size)
        if shape == "circle":
            draw.ellipse(box, fill=_COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=_COLOURS[fg])
        elif shape == "triangle":
            draw.polygon([(left + size // 2, top), (left, top + size), (left + size, top + size)], fill=_COLOURS[fg])
        else:
            stripe = max(4, min(width, height) // 12)
            for x in range(rng.randint(0, stripe), width, 2 * stripe):
                draw.rectangle((x, 0, x + stripe - 1, height), fill=_COLOURS[fg])
        tags = [f"{fg} {shape}", f"{bg} background", "simple"]
        if width != height:
            tags.append("wide" if width > height else "tall")
        name = f"sample_{index:02d}"
        image.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(", ".join(tags) + "\n", encoding="utf-8")
    return folder
