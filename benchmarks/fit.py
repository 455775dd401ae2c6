"""Fit my card on full-size models, without a GPU: lohatrain's memory estimate and its recipe (`memory.fit`, the
tab's Fit my card) for SDXL at 1024 px, batch 1, on an 8 GB card and SD 1.5 at 512 px, batch 4, on a 6 GB card.

    .venv/bin/python benchmarks/fit.py [--models sdxl,sd15,sd15-heavy] [--json PATH]

The models are the built-in configs' full-size ones (lohatrain.model_configs: UNet, VAE, text encoders, as a
checkpoint without a config beside it loads) with their weights on the meta device (shapes only: no RAM),
held in fp16 as the WebUI holds a checkpoint. Each is estimated for a CUDA card (`memory.estimate(device=
"cuda")`: the fakes run on the CPU under fp16 autocast, the whole model counted on the card as the WebUI holds
it before a run, the VAE and text encoders leaving it after caching as the trainer moves them). Attention runs
through torch's SDPA in the UNet and the VAE, as the WebUI's default cross-attention optimisation runs it. The
runs: the tab's defaults for the family (LoHa, its `highest` preset, gradient checkpointing, fp16, the UNet
alone; sd15-heavy also trains the text encoder, without checkpointing), one batch of square images at the
resolution, one caption.

A card of N GB has N x 2^30 bytes; the recipe fits the run into that less `--context-gb` (0.5) for CUDA's own
context, which the estimate does not count. It may use AdamW 8-bit (bitsandbytes runs on NVIDIA cards) and the
WebUI's FP8 weight option. Prints, per run, what it needs as set, each step of the recipe with what the run needs
after it, and whether it fits; writes the same as JSON; exits 1 when a run does not fit. An estimate, not a
measurement: no GPU has run it (benchmarks/gpu.py prints estimate and measured side by side on one). Minutes of
CPU: each SDXL estimate runs its caching pass and step on fakes (the recipe estimates once per change).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
for _path in (BENCHMARKS.parent, BENCHMARKS, BENCHMARKS.parent / "tools"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

with contextlib.redirect_stdout(sys.stderr):  # ldm prints notices at import; stdout carries the figures
    import lohatrain.ldm_importable  # noqa: F401  (first: sets up ldm's imports)
    from check_full_size_checkpoints import TEXT_SHAPES
    from gpu import sdpa_attention_forward
import ldm.modules.attention  # noqa: E402
import ldm.modules.diffusionmodules.model as vae_model  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lohatrain import memory, model_configs  # noqa: E402
from lohatrain.checkpoint import _parameters_on_meta  # noqa: E402
from lohatrain.families import ldm_parts  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402

GB = memory.GB
FP8_SETTING = "the WebUI's Settings → Optimizations → FP8 weight"
# name: (family, resolution, batch, card GB, changes from the tab's defaults): issue 22's targets, and a run
# that needs the recipe on SD 1.5 (the text encoder trained, no checkpointing)
CASES = {"sdxl": ("sdxl", 1024, 1, 8, {}), "sd15": ("sd1", 512, 4, 6, {}),
         "sd15-heavy": ("sd1", 512, 4, 6, {"gradient_checkpointing": False, "text_encoder_lr": 5e-5})}


def attnblock_forward(self, x):
    """The VAE's attention block (one head over the pixels) through torch's fused attention, as the WebUI's SDP
    optimisation runs it."""
    h = self.norm(x)
    b, c, height, width = h.shape
    q, k, v = (t.reshape(b, c, height * width).transpose(1, 2) for t in (self.q(h), self.k(h), self.v(h)))
    return x + self.proj_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, height, width))


@contextlib.contextmanager
def webui_attention():
    """SDPA in the UNet's attention (benchmarks/gpu.py's) and the VAE's, put back after. On the CPU, as on a card,
    SDPA takes a fused kernel: the scores are never held."""
    saved = ldm.modules.attention.CrossAttention.forward, vae_model.AttnBlock.forward
    ldm.modules.attention.CrossAttention.forward = sdpa_attention_forward
    vae_model.AttnBlock.forward = attnblock_forward
    try:
        yield
    finally:
        ldm.modules.attention.CrossAttention.forward, vae_model.AttnBlock.forward = saved


def full_size_model(family: str) -> torch.nn.Module:
    """The built-in config's model, its parameters on the meta device in fp16 (buffers real: the noise schedule)."""
    shapes = {k: torch.empty(shape, device="meta") for k, shape in TEXT_SHAPES[family].items()}
    with _parameters_on_meta(), contextlib.redirect_stdout(sys.stderr):
        model = model_configs.build(model_configs.BUILT_IN[family], shapes)
    return model.half().requires_grad_(False)


def check(name: str, context_gb: float) -> dict:
    """The tab's defaults for the model's family at the issue's size, estimated, and the recipe for its card."""
    family, resolution, batch, card_gb, changes = CASES[name]
    free = int((card_gb - context_gb) * GB)
    started = time.perf_counter()
    parts = ldm_parts(full_size_model(family))
    settings = TrainSettings.from_dict(
        {"name": name, "dataset_dir": ".", "output_dir": ".", "resolution": resolution, "batch_size": batch,
         "train_dtype": "fp16", **changes}, family)
    options = memory.FitOptions(fp8_setting=FP8_SETTING, why_no_8bit=lambda device: None)
    est = memory.estimate(parts, settings, free, device="cuda", options=options)
    recipe = est.fit or memory.Fit([], est.need, free)
    row = {"model": name, "resolution": resolution, "batch": batch, "card_gb": card_gb, "free_bytes": free,
           "settings": {k: getattr(settings, k) for k in ("training_method", "network_preset", "dim", "conv_dim",
                                                           "gradient_checkpointing", "text_encoder_lr",
                                                           "train_dtype", "optimizer")},
           "need_bytes": est.need, "parts_bytes": est.parts, "phase": est.phase,
           "steps": [{"label": s.label, "settings": s.settings, "host_setting": s.host_setting, "need_bytes": s.need}
                     for s in recipe.steps],
           "fits": recipe.fits, "fitted_need_bytes": recipe.need, "notes": recipe.notes,
           "seconds": round(time.perf_counter() - started, 1)}
    print(f"\n{name}: {resolution} px, batch {batch}, on a {card_gb} GB card ({free / GB:.2f} GB free for the run)")
    print(f"  {'the tab' + chr(39) + 's defaults' if not changes else changes}: needs ≈ {est.need / GB:.2f} GB ("
          + ", ".join(f"{k} {v / GB:.2f}" for k, v in est.parts.items()) + f"; peak while {est.phase})")
    for i, step in enumerate(recipe.steps, 1):
        print(f"  {i}. {step.label}: ≈ {step.need / GB:.2f} GB")
    print(f"  {'fits' if recipe.fits else 'does NOT fit'}: ≈ {recipe.need / GB:.2f} GB of {free / GB:.2f} GB"
          + "".join(f"\n  note: {n}" for n in recipe.notes) + f"  ({row['seconds']:.0f} s of CPU estimating)",
          flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CASES), help=f"which of {', '.join(CASES)} (default all)")
    parser.add_argument("--context-gb", type=float, default=0.5, help="CUDA's context, left free (default 0.5)")
    parser.add_argument("--json", type=Path, default=BENCHMARKS / "fit-results.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(CASES)}")
    print(f"torch {torch.__version__}; estimates on fake tensors for a CUDA card (GB of 2^30 bytes); unverified on "
          "a GPU", flush=True)
    with webui_attention():
        rows = [check(name, args.context_gb) for name in names]
    args.json.write_text(json.dumps({"torch": torch.__version__, "context_gb": args.context_gb, "rows": rows},
                                    indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.json}")
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
