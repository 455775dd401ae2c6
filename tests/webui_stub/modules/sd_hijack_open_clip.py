"""The host's wrapper around SDXL's OpenCLIP-bigG (`conditioner.embedders[1]` after hijack; sgm's
`FrozenOpenCLIPEmbedder2` is `.wrapped`, the open_clip model `.wrapped.model`).

Kept: chunking as in sd_hijack_clip, `<start_of_text>` / `<end_of_text>` ids and padding with 0 after the
first end token (so the pooled vector is read at the end token of each chunk); `encode_with_transformers`
takes `wrapped.encode_with_transformer(tokens)[wrapped.layer]` and hangs the dict's "pooled" on it.
The host tokenizes with open_clip's module-level `SimpleTokenizer`; open_clip cannot be imported here (it
imports torchvision), so `tokenizer` below is the same CLIP BPE (lohatrain.demo.clip_tokenizer) with
open_clip's `encode()` / `encoder` names.
Left out: SD2's `FrozenOpenCLIPEmbedderWithCustomWords`, textual inversion (`encode_embedding_init_text`).
"""
from modules import sd_hijack_clip


class _SimpleTokenizer:
    def __init__(self):
        from lohatrain.demo import clip_tokenizer
        self._bpe = clip_tokenizer()
        self.encoder = dict(self._bpe.get_vocab())
        self.encoder["<start_of_text>"] = self._bpe.bos_token_id
        self.encoder["<end_of_text>"] = self._bpe.eos_token_id

    def encode(self, text):
        return self._bpe(text, truncation=False, add_special_tokens=False)["input_ids"]


tokenizer = _SimpleTokenizer()


class FrozenOpenCLIPEmbedder2WithCustomWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.comma_token = tokenizer.encoder.get(',</w>')
        self.id_start = tokenizer.encoder["<start_of_text>"]
        self.id_end = tokenizer.encoder["<end_of_text>"]
        self.id_pad = 0

    def tokenize(self, texts):
        return [tokenizer.encode(text) for text in texts]

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
