"""The host's wrapper around SD1's CLIP text encoder (`cond_stage_model` after hijack; the ldm embedder is
`.wrapped`, the transformers model `.wrapped.transformer`).

Kept: prompts of any length as 75-token chunks (BOS + 75 + EOS, padded with EOS, every prompt of a batch
padded to the same chunk count), encoded separately and concatenated, and CLIP skip
(`opts.CLIP_stop_at_last_layers` = n > 1: hidden state n from the end, through the final layer norm).
Left out: emphasis parsing `(word:1.2)` / BREAK (prompts are read literally, as the host's emphasis "None"),
moving words after a nearby comma to the next chunk, textual-inversion embeddings.
"""
import torch

from modules.shared import opts


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    chunk_length = 75

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack
        self.tokenizer = wrapped.tokenizer
        vocab = self.tokenizer.get_vocab()
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = self.id_end
        self.comma_token = vocab.get(',</w>', None)
        self.is_trainable = False
        self.input_key = 'txt'
        self.return_pooled = False

    def chunks(self, text):
        ids = self.tokenizer([text], truncation=False, add_special_tokens=False)["input_ids"][0]
        pieces = [ids[i:i + self.chunk_length] for i in range(0, len(ids), self.chunk_length)] or [[]]
        return [[self.id_start] + p + [self.id_end] * (self.chunk_length + 1 - len(p)) for p in pieces]

    def encode_with_transformers(self, tokens):
        skip = opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=skip > 1)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state

    def forward(self, texts):
        batch = [self.chunks(t) for t in texts]
        count = max(len(c) for c in batch)
        empty = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        device = next(self.wrapped.transformer.parameters()).device
        zs = []
        for i in range(count):
            tokens = torch.tensor([c[i] if i < len(c) else empty for c in batch], device=device)
            zs.append(self.encode_with_transformers(tokens))
        return torch.hstack(zs)


def is_sd1_clip(module):
    return hasattr(module, "tokenizer") and hasattr(module, "transformer") and not isinstance(
        module, FrozenCLIPEmbedderWithCustomWords)

