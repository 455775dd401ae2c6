"""The host's wrappers around CLIP text encoders (after hijack: SD1's `cond_stage_model`, SDXL's
`conditioner.embedders[0]`; the sgm/ldm embedder is `.wrapped`, the transformers model `.wrapped.transformer`).

Kept, as the host's `TextConditionalModel` / `FrozenCLIPEmbedderWithCustomWordsBase`: prompts of any length
as 75-token chunks (BOS + 75 + EOS, padded with EOS, then tokens after the first EOS set to `id_pad` where it
differs, every prompt of a batch padded to the same chunk count with empty chunks), each chunk encoded
separately and the results concatenated; `(torch.hstack(zs), zs[0].pooled)` when the wrapped embedder has
`return_pooled` (SDXL's bigG: the pooled vector of the FIRST chunk); `is_trainable`, `input_key`,
`return_pooled` copied from the wrapped embedder and `legacy_ucg_val = None`, which sgm's conditioner reads.
- SD1 (`FrozenCLIPEmbedderWithCustomWords`): CLIP skip `opts.CLIP_stop_at_last_layers` = n > 1 takes hidden
  state n from the end through the final layer norm.
- SDXL CLIP-L (`FrozenCLIPEmbedderForSDXLWithCustomWords`): the wrapped embedder's own layer (sgm: "hidden",
  `layer_idx` = penultimate, no final norm); `opts.CLIP_stop_at_last_layers` only counts when
  `opts.sdxl_clip_l_skip` is on (then hidden state n from the end, still without the final norm).
Left out: emphasis parsing `(word:1.2)` / BREAK (prompts are read literally, as the host's emphasis "None";
without brackets "Original" gives the same numbers), moving words after a nearby comma to the next chunk,
textual-inversion embeddings (and the `EmbeddingsWithFixes` wrapper around the token embedding).
Ports modules/sd_hijack_clip.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import torch

from modules import devices
from modules.shared import opts


class TextConditionalModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.chunk_length = 75
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False
        self.comma_token = None
        self.id_start = None
        self.id_end = None
        self.id_pad = None

    def empty_chunk(self):
        return [self.id_start] + [self.id_end] * (self.chunk_length + 1)

    def tokenize(self, texts):
        """Token ids of each text, without BOS/EOS."""
        raise NotImplementedError

    def encode_with_transformers(self, tokens):
        raise NotImplementedError

    def tokenize_line(self, line):
        ids = self.tokenize([line])[0]
        pieces = [ids[i:i + self.chunk_length] for i in range(0, len(ids), self.chunk_length)] or [[]]
        return [[self.id_start] + p + [self.id_end] * (self.chunk_length + 1 - len(p)) for p in pieces]

    def forward(self, texts):
        batch_chunks = [self.tokenize_line(text) for text in texts]
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            tokens = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            zs.append(self.process_tokens(tokens))
        if self.return_pooled:
            return torch.hstack(zs), zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens):
        tokens = torch.asarray(remade_batch_tokens).to(devices.device)
        if self.id_end != self.id_pad:  # SD2/SDXL's OpenCLIP: pad with 0 after the first EOS
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        return self.encode_with_transformers(tokens)


class FrozenCLIPEmbedderWithCustomWordsBase(TextConditionalModel):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.hijack = hijack
        self.wrapped = wrapped
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(self.wrapped, 'return_pooled', False)
        self.legacy_ucg_val = None  # for sgm codebase


class FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedderWithCustomWordsBase):
    def __init__(self, wrapped, hijack):
        super().__init__(wrapped, hijack)
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.id_start = self.wrapped.tokenizer.bos_token_id
        self.id_end = self.wrapped.tokenizer.eos_token_id
        self.id_pad = self.id_end

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens):
        skip = opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=skip > 1)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state


class FrozenCLIPEmbedderForSDXLWithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def encode_with_transformers(self, tokens):
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=self.wrapped.layer == "hidden")
        if opts.sdxl_clip_l_skip is True:
            return outputs.hidden_states[-opts.CLIP_stop_at_last_layers]
        if self.wrapped.layer == "last":
            return outputs.last_hidden_state
        return outputs.hidden_states[self.wrapped.layer_idx]


def is_sd1_clip(module):
    """ldm's FrozenCLIPEmbedder (the host checks the type; the stand-in the attributes the wrapper reads)."""
    return (hasattr(module, "tokenizer") and hasattr(module, "transformer")
            and not isinstance(module, FrozenCLIPEmbedderWithCustomWordsBase))
