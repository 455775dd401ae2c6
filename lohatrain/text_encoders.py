"""lohatrain's offline text encoders, of any size: what a checkpoint's CLIP (SD1, SDXL's CLIP-L) or OpenCLIP (SD2,
SDXL's bigG) is built as outside the WebUI (lohatrain.model_configs), and the tiny models' text encoders.

ldm's `FrozenCLIPEmbedder` and `FrozenOpenCLIPEmbedder` cannot be used there: they download their weights and
tokenizer (`from_pretrained`, open_clip's pretrained tags), and `ldm.modules.encoders.modules` imports open_clip,
hence torchvision. These have the same attribute and module names (so the same checkpoint keys and the same
structure for code that reaches into them) and take the real CLIP tokenizer from the BPE file open-clip-torch ships.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    """Nothing a model does changes its tokenizer, which is megabytes of Python dicts: a copy of a model
    shares it instead of copying it (most of the time `copy.deepcopy` of a tiny model took)."""

    def __deepcopy__(self, memo):
        return self


@functools.lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP ViT-L/14 tokenizer (as in SD1), built offline once per process; pads with <|endoftext|>."""
    vocab_file, merges_file = clip_tokenizer_files()
    return _SharedCLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)


class CLIPEmbedder(nn.Module):
    """ldm's `FrozenCLIPEmbedder` (SD1's text encoder), offline, with the same attribute names
    (`tokenizer`, `transformer`, `max_length`, `layer`, `layer_idx`), so code that reaches
    into SD1's text encoder finds the same structure.

    `layer="hidden"` with `layer_idx=-2` is CLIP skip 2, computed the way the WebUI does:
    that hidden state passed through the final layer norm.
    """

    LAYERS = ("last", "hidden")

    def __init__(self, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_length: int = CLIP_MAX_LENGTH,
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


class OpenCLIPEmbedder(nn.Module):
    """ldm's `FrozenOpenCLIPEmbedder` (SD2's text encoder), offline, with the same attribute names and the
    same encoding path, so code that reaches into SD2's text encoder finds the same structure.

    Like open_clip 2.20 (the WebUI's pin) the transformer runs sequence-first and its attention is a fused
    `nn.MultiheadAttention`. Tokens come from the real CLIP tokenizer (`clip_tokenizer()`, the same BPE
    vocabulary as `open_clip.tokenize`): `<start> … <end>`, cut to 77, padded with 0 as open_clip pads.

    `layer="last"` (layer_idx 0) or `"penultimate"` (layer_idx 1, what SD2's configs use): the last
    `layer_idx` residual blocks are skipped, then `ln_final` is applied, as in ldm's `encode_with_transformer`.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, width: int, layers: int, heads: int, max_length: int = CLIP_MAX_LENGTH,
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
