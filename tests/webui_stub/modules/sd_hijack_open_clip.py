"""The host's wrappers around OpenCLIP text encoders: SD2's `cond_stage_model` after hijack
(`FrozenOpenCLIPEmbedderWithCustomWords`; ldm's `FrozenOpenCLIPEmbedder` is `.wrapped`, the open_clip model
`.wrapped.model`) and SDXL's `conditioner.embedders[1]` (`FrozenOpenCLIPEmbedder2WithCustomWords`; sgm's
`FrozenOpenCLIPEmbedder2` is `.wrapped`).

Kept: chunking as in sd_hijack_clip, `<start_of_text>` / `<end_of_text>` ids and padding with 0 after the
first end token (open_clip's padding; for bigG it also puts the pooled vector at the end token of each chunk).
- SD2: `encode_with_transformers` returns `wrapped.encode_with_transformer(tokens)` as it is: the layer the
  checkpoint's config chose (`wrapped.layer` / `layer_idx`, penultimate for SD2) through `ln_final`. The
  host's CLIP-skip option does nothing here (the host has only a comment where it would set `layer_idx`).
- SDXL bigG: `wrapped.encode_with_transformer(tokens)[wrapped.layer]` with the dict's "pooled" hung on it.
The host tokenizes with open_clip's module-level `SimpleTokenizer`; open_clip cannot be imported here (it
imports torchvision), so `tokenizer` below is the same CLIP BPE (lohatrain.text_encoders.clip_tokenizer) with
open_clip's `encode()` / `encoder` names.
Left out: textual inversion (`encode_embedding_init_text`, and the `EmbeddingsWithFixes` wrapper the host puts
around `wrapped.model.token_embedding`), the `use_old_emphasis_implementation` assertion.
Ports modules/sd_hijack_open_clip.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from modules import sd_hijack_clip


class _SimpleTokenizer:
    def __init__(self):
        from lohatrain.text_encoders import clip_tokenizer
        self._bpe = clip_tokenizer()
        self.encoder = dict(self._bpe.get_vocab())
        self.encoder["<start_of_text>"] = self._bpe.bos_token_id
        self.encoder["<end_of_text>"] = self._bpe.eos_token_id

    def encode(self, text):
        return self._bpe(text, truncation=False, add_special_tokens=False)["input_ids"]


tokenizer = _SimpleTokenizer()


class FrozenOpenCLIPEmbedderWithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = tokenizer.encoder.get(',</w>')
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

    def encode_with_transformers(self, tokens):
        # set self.wrapped.layer_idx here according to opts.CLIP_stop_at_last_layers  (the host's comment)
        z = self.wrapped.encode_with_transformer(tokens)
        return z


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenOpenCLIPEmbedderWithCustomWords):
    """The host repeats SD2's wrapper here; only the encoding differs (the stand-in's type checks use `type()
    is`, so sharing the rest by subclassing changes no decision)."""

    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]
        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled
        return z


def is_open_clip2(module):
    """sgm's FrozenOpenCLIPEmbedder2 (the host checks the type name; the stand-in what the wrapper reads)."""
    return (hasattr(module, "model") and hasattr(module, "encode_with_transformer") and hasattr(module, "return_pooled")
            and not isinstance(module, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase))


def is_open_clip(module):
    """ldm's FrozenOpenCLIPEmbedder, SD2's text encoder (the host checks the type; the stand-in what the wrapper
    reads, and that it is not bigG, which has `return_pooled`)."""
    return (hasattr(module, "model") and hasattr(module, "encode_with_transformer")
            and not hasattr(module, "return_pooled")
            and not isinstance(module, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase))
