"""What a network adapts (the target sets, named as LyCORIS' presets) and kohya's per-block learning-rate weights.

Target sets (the `network_targets` setting):
- "attn-only": the attention projections only (q, k, v, out of every UNet attention; the text encoder's
  self-attention), as LyCORIS' `attn-only`;
- "attn-mlp" (the default, what lohatrain always trained): the UNet's attention blocks whole (attention, MLP,
  proj_in/out; the text encoder's attention and MLP), as LyCORIS' `attn-mlp`, and with conv_dim > 0 also the
  ResBlocks and down/up-samplers, as kohya's LoCon;
- "full": LyCORIS' `full`: the attention blocks, the ResBlocks and samplers, and the layers outside the blocks:
  conv_in, conv_out, the time embedding and (SDXL) the label embedding. Linear and 1x1 layers take dim/alpha; 3x3
  convolutions (conv_in, conv_out, the ResBlocks' and samplers') are adapted only with conv_dim > 0, as in LyCORIS.

Block weights (kohya sd-scripts' `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`):
each UNet layer's learning rate is the UNet's times the weight of its block. Blocks are the ldm UNet's own:
`down_lr_weight[i]` is `input_blocks.i` (i = 0 is conv_in), `up_lr_weight[i]` `output_blocks.i`; the middle is one
block on SD 1.x/2.x and three (`middle_block.0/1/2`) on SDXL. Layers outside them (the time and label embeddings,
conv_out) keep weight 1, as kohya gives SDXL's. A weight is a comma list (an empty entry is 0; missing ones are 1)
or, for down and up, a curve over the blocks: `sine`, `cosine`, `linear`, `reverse_linear` or `zeros`, with an
optional `+base` added to each. Weights at or below the zero threshold become 0; a block of weight 0 is not trained.
"""
from __future__ import annotations

import math
import re

TARGETS = ("attn-only", "attn-mlp", "full")
DEFAULT_TARGETS = "attn-mlp"
BLOCK_WEIGHTS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
CURVES = ("sine", "cosine", "linear", "reverse_linear", "zeros")

# Inside an attention block: the projections of its attentions (ldm's, sgm's and Forge's CrossAttention names).
ATTENTION_LAYER = re.compile(r"(^|\.)attn\d\.(to_[qkv]|to_out\.0)$")
# A text-encoder key of an MLP layer (every family's keys end so): left out by "attn-only".
TEXT_MLP_KEY = re.compile(r"_mlp_fc[12]$")


def weights_problem(name: str, text: str) -> str | None:
    """Why a block-weight setting is not in kohya's format, or None (the count per family is checked later)."""
    try:
        parse_weights(text, None, curves=name != "mid_lr_weight")
    except ValueError as e:
        return f"{name}: {e}"
    return None


def parse_weights(text: str, count: int | None, curves: bool = True) -> list[float] | None:
    """kohya's block weights as numbers, `count` of them (a shorter list is padded with 1); None for "" (not set).
    Raises ValueError saying what is wrong."""
    text = text.strip()
    if not text:
        return None
    name, _, base = text.partition("+")
    if curves and name.strip() in CURVES:
        offset = _number(base, curves) if base.strip() else 0.0
        n = count or 1
        position = [i / max(n - 1, 1) for i in range(n)]
        shape = {"sine": [math.sin(math.pi / 2 * p) for p in position],
                 "cosine": [math.sin(math.pi / 2 * p) for p in reversed(position)],
                 "linear": position, "reverse_linear": position[::-1], "zeros": [0.0] * n}[name.strip()]
        return [w + offset for w in shape]
    weights = [_number(part, curves) if part.strip() else 0.0 for part in text.split(",")]
    if count is not None and len(weights) > count:
        raise ValueError(f"{len(weights)} weights given, this model has {count} such blocks")
    return weights + [1.0] * ((count or len(weights)) - len(weights))


def _number(text: str, curves: bool) -> float:
    hint = f", or a curve: {', '.join(CURVES)} (with an optional +base)" if curves else ""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number; give numbers separated by commas{hint}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a weight must be a number of 0 or more, not {text.strip()}")
    return value


def block_weights(settings, counts: dict[str, int]) -> dict[tuple[str, int], float] | None:
    """(down|mid|up, index) → learning-rate weight for a family's blocks (`counts`: blocks of each kind); None when no
    weight is set (the run keeps one learning rate). Raises ValueError for more weights than the family has."""
    if not any(getattr(settings, name).strip() for name in BLOCK_WEIGHTS):
        return None
    weights = {}
    for name in BLOCK_WEIGHTS:
        kind = name.split("_")[0]
        try:
            given = parse_weights(getattr(settings, name), counts[kind], curves=kind != "mid")
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if given is None:
            given = [1.0] * counts[kind]
        else:  # kohya applies the threshold to the weights given only
            given = [w if w > settings.block_lr_zero_threshold else 0.0 for w in given]
        weights.update({(kind, i): w for i, w in enumerate(given)})
    return weights
