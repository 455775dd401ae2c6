"""GPU benchmark: speed, peak VRAM and FLOP utilisation of lohatrain's training step on full-size SD1.5 and SDXL.

    .venv-stock/bin/python benchmarks/gpu.py [--json PATH] [--peak-tflops N] [--models sd15,sdxl]
    .venv-stock/bin/python benchmarks/gpu.py --quick   every type once per model: under 8 minutes on one H100
    .venv/bin/python benchmarks/gpu.py --tiny [--quick]   the dry runs: tiny UNets on the CPU (what CI runs)

Needs a CUDA build of torch (.venv-stock has torch 2.1.2+cu121, the stock WebUI's). Prints one table and
writes it as JSON (default benchmarks/gpu-results.json; --tiny: gpu-results-tiny.json). Without a CUDA GPU
it says so, runs the --tiny dry run instead and exits 0. It measures; it asserts nothing about speed.

What a cell runs: lohatrain's own training step (`lohatrain.loop.step`: batch, noise and timesteps, the UNet under
fp16 autocast, the loss, GradScaler, fused AdamW, the LR schedule), set up as `trainer.train` sets up a run
(ModelGuard, the fp16 norm routing, the network of lohatrain.network / lohatrain.methods at the type's
default "highest" preset, `loop.checkpoint_blocks`, `trainer._determinism`), on a UNet with random
weights built in code (speed and memory do not depend on weight values) held in fp16 as the WebUI holds a
checkpoint. Latents and the caption's conditioning are random tensors of the real shapes, cached as the
trainer caches them; there is no VAE or text encoder (the trainer moves both off the GPU before the first
step). Attention runs through torch's scaled_dot_product_attention with the memory-efficient kernel off,
as the WebUI's default cross-attention optimisation runs it ("Automatic" is sdp-no-mem without
--xformers), and TF32 is on, as the WebUI turns it on at start.

- sd15: ldm's UNetModel with v1-inference.yaml's parameters, 512 px (latent 64x64), batch 4;
- sdxl: the base UNet (lohatrain.demo_sdxl.FULL_SDXL, 2.57 B parameters), 1024 px, batch 1.

The matrix, per model (20 cells): every network type the tab offers (LoRA, LoCon, LoHa, LoKr, and DoRA on
LoRA, LoCon and LoHa) with gradient checkpointing on and off; for LoHa also lycoris-lora's own forward (the
base op, then a second full-size op with ΔW: benchmarks/engine.py `forward_style`) against lohatrain's one
merged op, and the `deterministic` setting on, each with checkpointing on and off.

--quick (14 cells): per model, every network type (the 7 above) with gradient checkpointing on (the tab's
default) and lohatrain's forward; 1 warm-up step and 3 timed ones. Sized for one H100 in under 8 minutes
(not yet run on one): each cell's memory estimate runs its step on fakes in Python, ~10-30 s of CPU for SDXL
and less for SD1.5, which dominates; the GPU's part is a counted first step and 4 more (SDXL ~0.4 s a step
at 1024 px), plus building each model once; cells not started by --max-minutes (7) are skipped, so it ends
within 8 minutes whatever the CPU.

Per cell: a first step, its FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (a deterministic
cell takes its twin's count: the same maths), `--warmup` (2) more untimed steps, then `--steps` (6) timed
ones between two `torch.cuda.synchronize()`. Cells not started within `--max-minutes` (7) are skipped.

- it/s: timed steps / their seconds (a step is one batch: 4 images for sd15, 1 for sdxl);
- peak GB: `torch.cuda.max_memory_allocated` over the cell, stats reset before it: the fp16 UNet, the
  network with its gradients and AdamW state, the activations. Not CUDA's context or the allocator's cache;
- est GB: lohatrain's memory estimate of the same peak (`lohatrain.memory.estimate`, what the tab and
  `--estimate` show before a run), made before the cell on fake tensors: beside peak GB, the check that it
  holds on a GPU (a deterministic cell takes its twin's; `--no-estimate` leaves it out);
- TFLOP/step: the counted FLOPs of one step as it runs (matmuls, convolutions and attention, forward and
  backward; checkpointing's recomputation and lycoris' second op included: the work the card does);
- of peak: TFLOP/step x it/s / the card's dense fp16 tensor peak.

A cell that runs out of memory is reported as OOM, any other failure as "error" (its traceback on stderr),
and the run goes on.

Dense fp16 peaks (PEAK_TFLOPS) come from the vendors' datasheets (NVIDIA H100, H200, A100, L40S, L40, L4,
A10, V100, T4, RTX A6000; AMD Instinct MI250X, MI300X) and NVIDIA's Ampere GA102 and Ada AD102 architecture
whitepapers (GeForce cards), without 2:4 sparsity. GeForce cards run fp16 matmuls with fp32 accumulation
(what torch uses) at half their fp16-accumulate rate; their fp32-accumulate figure is the one listed. An
unknown card gets "n/a" unless --peak-tflops gives its figure.

--tiny: the demo models' UNets (lohatrain.demo's SD1, demo_sdxl.TINY_SDXL), 64 px, on the CPU in fp32 (CPU
torch 2.1 cannot train in fp16), each type's "small" preset, 5 cells that take every path, 2 steps each. Its
figures only show that every path runs; peak GB is not measured on the CPU (null in the JSON); est GB is the
estimate for training on the CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import re
import sys
import time
import traceback
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
for _path in (BENCHMARKS.parent, BENCHMARKS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

with contextlib.redirect_stdout(sys.stderr):  # ldm prints notices at import; stdout carries the table
    import lohatrain.ldm_importable  # noqa: F401  (first: sets up ldm's imports)
    from engine import SD15_UNET, forward_style
import ldm.modules.attention  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ldm.models.diffusion.ddpm import DiffusionWrapper, LatentDiffusion  # noqa: E402
from ldm.modules.diffusionmodules.util import make_beta_schedule  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lohatrain import compat, loop, memory, trainer  # noqa: E402
from lohatrain.cache import Cache, Sample  # noqa: E402
from lohatrain import dataset as ds  # noqa: E402
from lohatrain.demo import TINY_SD1_CONFIG  # noqa: E402
from lohatrain.demo_sdxl import FULL_SDXL, TINY_SDXL, build_unet, conditioning_widths  # noqa: E402
from lohatrain.distributed import ALONE  # noqa: E402
from lohatrain.families import SD1, SDXL  # noqa: E402
from lohatrain.methods import TYPES  # noqa: E402
from lohatrain.model_guard import ModelGuard  # noqa: E402
from lohatrain.network import Network, plan_unet  # noqa: E402
from lohatrain.precision import COMPUTE_DTYPES, route_low_precision_layers  # noqa: E402
from lohatrain.parts import ModelParts  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402
from lohatrain.sgm_standin import SIZE_KEYS, ConcatTimestepEmbedderND, GeneralConditioner, OpenAIWrapper  # noqa: E402

# (device-name pattern, dense fp16 TFLOPS, what it is): first match wins. See the module docstring.
PEAK_TFLOPS = (
    (r"H100 PCIe|H800 PCIe", 756.0, "H100 PCIe"),
    (r"H200|H100.*HBM3|H100 SXM|H800", 989.4, "H100 SXM / H200"),
    (r"A100|A800", 312.0, "A100"),
    (r"L40S", 362.05, "L40S"),
    (r"\bL40\b", 181.05, "L40"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bA10\b", 125.0, "A10"),
    (r"RTX A6000", 154.8, "RTX A6000"),
    (r"RTX 4090(?! D)", 165.2, "RTX 4090 (fp32 accumulate)"),
    (r"RTX 3090(?! Ti)", 71.0, "RTX 3090 (fp32 accumulate)"),
    (r"V100.*SXM", 125.0, "V100 SXM2"),
    (r"V100", 112.0, "V100 PCIe"),
    (r"\bT4\b", 65.0, "T4"),
    (r"MI300X", 1307.4, "MI300X"),
    (r"MI250X", 383.0, "MI250X"),
)

CAPTION = "random conditioning"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: type
    resolution: int
    batch: int
    unet: dict  # SD1: ldm UNetModel's parameters; SDXL: lohatrain.demo_sdxl's sizes


MODELS = {
    "sd15": ModelSpec("sd15", SD1, 512, 4, SD15_UNET),
    "sdxl": ModelSpec("sdxl", SDXL, 1024, 1, FULL_SDXL),
}
TINY_MODELS = {
    "sd1-tiny": ModelSpec("sd1-tiny", SD1, 64, 2, TINY_SD1_CONFIG["unet_config"]["params"]),
    "sdxl-tiny": ModelSpec("sdxl-tiny", SDXL, 64, 1, TINY_SDXL),
}


@dataclass(frozen=True)
class Cell:
    model: str
    method: str
    dora: bool = False
    checkpointing: bool = True
    forward: str = "merged"  # lohatrain's merged op, or "lycoris": lycoris-lora's base op + ΔW op
    deterministic: bool = False

    @property
    def network(self) -> str:
        return self.method + ("+dora" if self.dora else "")


NETWORK_TYPES = [(m, False) for m in TYPES] + [(m, True) for m, t in TYPES.items() if t.dora]


def full_matrix(models: list[str]) -> list[Cell]:
    cells = []
    for model in models:
        cells += [Cell(model, method, dora, ckpt) for method, dora in NETWORK_TYPES for ckpt in (True, False)]
        for ckpt in (True, False):
            cells += [Cell(model, "loha", checkpointing=ckpt, forward="lycoris"),
                      Cell(model, "loha", checkpointing=ckpt, deterministic=True),
                      Cell(model, "loha", checkpointing=ckpt, forward="lycoris", deterministic=True)]
    return cells


def quick_matrix(models: list[str]) -> list[Cell]:
    """Every network type once per model, as the tab trains it by default (checkpointing on, lohatrain's forward)."""
    return [Cell(model, method, dora) for model in models for method, dora in NETWORK_TYPES]


def tiny_matrix() -> list[Cell]:
    """Every path of the full matrix in 5 cells: on each tiny model checkpointing on and off and DoRA; across
    them both forwards, the deterministic setting and every network type."""
    return [Cell("sd1-tiny", "loha"),
            Cell("sd1-tiny", "loha", checkpointing=False, forward="lycoris", deterministic=True),
            Cell("sd1-tiny", "locon", dora=True, checkpointing=False),
            Cell("sdxl-tiny", "lokr", deterministic=True),
            Cell("sdxl-tiny", "lora", dora=True, checkpointing=False)]


class BareModel(nn.Module):
    """What a training step reads of a loaded checkpoint once latents and captions are cached: the UNet in its
    wrapper (`model.model.diffusion_model`), the noise schedule, ldm's own `apply_model` (SD1) and SDXL's
    parameter-free size embedders (`condition_on_images`)."""

    apply_model = LatentDiffusion.apply_model

    def __init__(self, wrapper: nn.Module, conditioner: nn.Module | None = None):
        super().__init__()
        self.model = wrapper
        self.conditioner = conditioner
        # SD1's and SDXL's schedule (ldm's "linear", sgm's legacy DDPM discretization)
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.alphas_cumprod = torch.tensor(1 - betas, device="cpu").cumprod(0).float()


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[BareModel, object]:
    """The model with random weights in `dtype` (the WebUI's `model.half()`), frozen, and one caption's
    cached conditioning (float32, as the trainer caches it)."""
    gen = torch.Generator().manual_seed(0)
    with torch.device(device), contextlib.redirect_stdout(sys.stderr):
        if spec.family is SDXL:
            embedders = [ConcatTimestepEmbedderND(spec.unet["size_dim"], key) for key in SIZE_KEYS]
            model = BareModel(OpenAIWrapper(build_unet(spec.unet)), GeneralConditioner(embedders))
        else:
            config = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": dict(spec.unet)}
            model = BareModel(DiffusionWrapper(config, "crossattn"))
    for module in model.modules():  # ldm zeroes each block's last layer; DoRA divides by a weight's norm
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.02)
    if spec.family is SDXL:
        crossattn, vector = conditioning_widths(spec.unet)
        cond = {"crossattn": torch.randn(1, 77, crossattn, generator=gen).to(device),
                "vector": torch.randn(1, vector, generator=gen).to(device)}
    else:
        cond = torch.randn(1, 77, spec.unet["context_dim"], generator=gen).to(device)
    return model.to(dtype).requires_grad_(False), cond


def random_cache(spec: ModelSpec, cond, device: torch.device) -> Cache:
    """One batch of cached images (random latents, one caption): what the trainer's cache holds."""
    side, latent = spec.resolution, spec.resolution // 8
    gen = torch.Generator().manual_seed(1)
    sizes = (side, side, 0, 0, side, side)
    samples = [Sample(ds.ImageItem(Path(f"random-{i}.png"), CAPTION, side, side), (side, side), None,
                               torch.randn(1, 4, latent, latent, generator=gen).to(device), None, sizes, sizes)
               for i in range(spec.batch)]
    return Cache(dict(enumerate(samples)), [CAPTION] * len(samples), {CAPTION: cond}, per_step_text=False)


def sdpa_attention_forward(self, x, context=None):
    """ldm's CrossAttention through torch's fused attention, as the WebUI's SDP optimisation runs it."""
    context = x if context is None else context
    b, n, _ = x.shape
    q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)
               for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


@contextlib.contextmanager
def webui_runtime():
    """The WebUI's defaults for the run: SDPA without the memory-efficient kernel, TF32 on; put back after."""
    cls = ldm.modules.attention.CrossAttention
    saved = (cls.forward, torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    cls.forward = sdpa_attention_forward
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        cls.forward = saved[0]
        torch.backends.cuda.enable_mem_efficient_sdp(saved[1])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[2:]


def cell_settings(cell: Cell, spec: ModelSpec, train_dtype: str) -> TrainSettings:
    """The tab's defaults for the family and type (learning rate, the "highest" preset; the tiny models take
    "small", which keeps the dry run short), with the cell's switches."""
    settings = TrainSettings.defaults_for(spec.family.name, cell.method)
    if spec.name in TINY_MODELS:
        settings = settings.with_preset("small", spec.family.name)
    return dataclasses.replace(
        settings, dora=cell.dora, gradient_checkpointing=cell.checkpointing, deterministic=cell.deterministic,
        train_dtype=train_dtype, resolution=spec.resolution, batch_size=spec.batch, seed=0)


def free_memory(device: torch.device) -> None:
    """Give the GPU memory of what is gone back (a network's forwards close over it: a reference cycle)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_cell(cell: Cell, spec: ModelSpec, model: BareModel, cache: Cache, device: torch.device,
             steps: int, warmup: int, count: bool) -> dict:
    """Set the cell's run up as lohatrain.trainer does (same calls, same order, the UNet's part), then take a
    first step (its FLOPs counted if `count`), `warmup` untimed steps and `steps` timed ones."""
    family, unet = spec.family, spec.family.unet(model)
    held_in_fp16 = next(unet.parameters()).dtype == torch.float16
    settings = cell_settings(cell, spec, "fp16" if held_in_fp16 else "fp32")
    compute_dtype = COMPUTE_DTYPES[settings.train_dtype]
    with ExitStack() as stack:
        guard = stack.enter_context(ModelGuard(model))
        stack.enter_context(trainer._determinism(settings.deterministic and device.type == "cuda"))
        guard.disable_ldm_checkpointing()
        route_low_precision_layers([unet], compute_dtype)
        autocast = (partial(torch.autocast, device.type, dtype=compute_dtype) if compute_dtype != torch.float32
                    else nullcontext)
        plans = plan_unet(family, unet, settings.dim, settings.alpha, settings.conv_dim, settings.conv_alpha)
        network = Network(plans, settings.seed, settings.training_method, settings.lokr_factor,
                          settings.dora).to(device)
        with forward_style(cell.forward == "lycoris"):
            network.attach()
        stack.callback(network.detach)
        if settings.gradient_checkpointing:
            loop.checkpoint_blocks(unet)
        optimizer = torch.optim.AdamW([{"params": network.parameters_of(text_encoder=False),
                                        "lr": settings.learning_rate}], weight_decay=0.01,
                                      fused=compat.fused_adamw_supported(device.type))
        state = loop.LoopState(network, optimizer,
                         torch.optim.lr_scheduler.LambdaLR(optimizer, loop.lr_lambda(settings)),
                         compat.grad_scaler(device.type, enabled=compute_dtype == torch.float16),
                         ds.BucketBatchSampler([s.bucket for s in cache.samples.values()], settings.batch_size,
                                               torch.Generator().manual_seed(0)),
                         torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), random.Random(3))
        parts = bare_parts(spec, model)
        setup = loop.Setup(parts, loop.Prediction(network, parts.predict), cache, settings, None, False,
                           loop.training_alphas_cumprod(parts.alphas_cumprod).to(device), device, autocast, ALONE)
        step = partial(loop.step, setup, state)
        counter = FlopCounterMode(display=False) if count else None
        with counter or nullcontext():
            step()
        for _ in range(warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        seconds = time.perf_counter() - start
    return {"it_per_s": steps / seconds, **({"step_tflop": counter.get_total_flops() / 1e12} if count else {})}


def bare_parts(spec: ModelSpec, model: BareModel) -> ModelParts:
    """What the engine sees of the bare model: its UNet, prediction, schedule and size conditioning."""
    family = spec.family
    return ModelParts(family, family.unet(model), None, None, partial(family.predict, model), None, None,
                      family.alphas_cumprod(model), False, list, False,
                      condition_on_images=partial(family.condition_on_images, model))


def estimate_cell(cell: Cell, spec: ModelSpec, model: BareModel) -> float:
    """lohatrain.memory's estimate of the cell's peak, in GB (1e9 bytes, as peak GB): the weights, the network and
    AdamW's state, the cached batch, and the step run on fake tensors (lohatrain's estimate before a run)."""
    unet = spec.family.unet(model)
    settings = cell_settings(cell, spec, "fp16" if next(unet.parameters()).dtype == torch.float16 else "fp32")
    with forward_style(cell.forward == "lycoris"):
        return memory.estimate(bare_parts(spec, model), settings, suggest=False).need / 1e9


def blank_row(cell: Cell, spec: ModelSpec, status: str) -> dict:
    return {**dataclasses.asdict(cell), "network": cell.network, "resolution": spec.resolution, "batch": spec.batch,
            "status": status, "error": None, "it_per_s": None, "peak_vram_gb": None, "estimate_gb": None,
            "step_tflop": None, "achieved_tflops": None, "peak_share": None, "cell_seconds": None}


def measure(cell: Cell, spec: ModelSpec, model, cache, device, steps: int, warmup: int, peak: float | None,
            flops: dict, estimates: dict | None) -> dict:
    """One row: the cell's figures, or its OOM / error, with the memory it held freed either way. `flops`
    holds the TFLOP/step counted so far: a deterministic cell does the same maths as its twin without, so the
    twin's count serves (counting costs seconds of Python per step); `estimates` the same for the memory
    estimate (made before the cell, on fake tensors: it allocates nothing), or None to make none."""
    row = blank_row(cell, spec, "ok")
    twin = dataclasses.replace(cell, deterministic=False)
    if estimates is not None:
        try:
            row["estimate_gb"] = estimates[twin] if twin in estimates else estimates.setdefault(
                twin, estimate_cell(cell, spec, model))
        except Exception:  # noqa: BLE001 — the estimate's failure is reported; the cell is still measured
            traceback.print_exc()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row.update(run_cell(cell, spec, model, cache, device, steps, warmup, count=twin not in flops))
        row["step_tflop"] = flops.setdefault(twin, row["step_tflop"])
    except compat.OutOfMemoryError:
        row["status"] = "oom"
    except Exception as e:  # noqa: BLE001 — reported in the row (traceback on stderr); the next cells still run
        traceback.print_exc()
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if device.type == "cuda" and row["status"] == "ok":
        row["peak_vram_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    free_memory(device)
    if row["status"] == "ok":
        row["achieved_tflops"] = row["step_tflop"] * row["it_per_s"]
        row["peak_share"] = row["achieved_tflops"] / peak if peak else None
    return row


def lookup_peak(device_name: str) -> tuple[float, str] | None:
    for pattern, tflops, label in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tflops, label
    return None


# ----------------------------------------------------------------------------------------------- the table

COLUMNS = (("model", 9), ("network", 10), ("ckpt", 4), ("forward", 7), ("determ", 6), ("it/s", 7),
           ("peak GB", 7), ("est GB", 6), ("TFLOP/step", 10), ("TFLOPS", 7), ("of peak", 7))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    def line(values):
        return "  ".join(str(v).ljust(w) if i < 5 else str(v).rjust(w)
                         for i, (v, (_, w)) in enumerate(zip(values, COLUMNS)))

    lines = [line(name for name, _ in COLUMNS), line("-" * w for _, w in COLUMNS)]
    for r in rows:
        speed = _fmt(r["it_per_s"], ".2f") if r["status"] == "ok" else r["status"].upper()
        share = "n/a" if r["status"] == "ok" and r["peak_share"] is None else _fmt(r["peak_share"], ".1%")
        lines.append(line([r["model"], r["network"], "on" if r["checkpointing"] else "off", r["forward"],
                           "on" if r["deterministic"] else "off", speed, _fmt(r["peak_vram_gb"], ".2f"),
                           _fmt(r["estimate_gb"], ".2f"), _fmt(r["step_tflop"], ".3g"),
                           _fmt(r["achieved_tflops"], ".3g"), share]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main

def run_matrix(cells: list[Cell], specs: dict, device: torch.device, weights: torch.dtype, steps: int, warmup: int,
               peak: float | None, deadline: float, estimate: bool = True) -> list[dict]:
    """Every cell, model by model (each built once), in order; a cell not started by `deadline` is skipped."""
    rows, flops, estimates, started = [], {}, {} if estimate else None, time.perf_counter()
    for model_name in dict.fromkeys(c.model for c in cells):
        spec = specs[model_name]
        model, cond = build_model(spec, device, weights)
        cache = random_cache(spec, cond, device)
        free_memory(device)  # the float32 weights the model was built in
        for cell in (c for c in cells if c.model == model_name):
            if time.perf_counter() > deadline:
                rows.append(blank_row(cell, spec, "skipped"))
                continue
            cell_started = time.perf_counter()
            rows.append(measure(cell, spec, model, cache, device, steps, warmup, peak, flops, estimates))
            r = rows[-1]
            r["cell_seconds"] = round(time.perf_counter() - cell_started, 1)
            print(f"[{len(rows)}/{len(cells)}] {cell.model} {cell.network} ckpt={cell.checkpointing} {cell.forward} "
                  f"det={cell.deterministic}: {r['status']} {_fmt(r['it_per_s'], '.2f')} it/s, peak "
                  f"{_fmt(r['peak_vram_gb'], '.2f')} GB, estimate {_fmt(r['estimate_gb'], '.2f')} GB "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        del model, cond, cache
        free_memory(device)
    return rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the dry run: tiny UNets on the CPU, in seconds")
    parser.add_argument("--quick", action="store_true",
                        help="every network type once per model, checkpointing on, 1 warm-up and 3 timed steps: "
                             "under 8 minutes on one H100 (with --tiny: its dry run on the tiny UNets)")
    parser.add_argument("--json", type=Path, help="where the JSON goes (default benchmarks/gpu-results.json; "
                                                  "-quick, -tiny before .json for those runs)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense fp16 peak (default: by device name)")
    parser.add_argument("--models", default="sd15,sdxl", help="full-size models to run (default sd15,sdxl)")
    parser.add_argument("--steps", type=int, help="timed steps per cell (default 6; --quick 3; --tiny 1)")
    parser.add_argument("--warmup", type=int, help="untimed steps after the first one (default 2; --quick 1; "
                                                   "--tiny 0)")
    parser.add_argument("--no-estimate", action="store_true",
                        help="leave out lohatrain's memory estimate of each cell (seconds of CPU each)")
    parser.add_argument("--max-minutes", type=float, default=7.0,
                        help="cells not started by then are skipped (default 7)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}: choose from {', '.join(MODELS)}")

    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA GPU: nothing to measure on this machine (a CUDA build of torch and an NVIDIA card are "
              "needed); running the --tiny dry run on the CPU instead", flush=True)
        args.tiny = True
    device = torch.device("cpu" if args.tiny else "cuda")
    specs = TINY_MODELS if args.tiny else MODELS
    if args.quick:
        cells = quick_matrix(list(TINY_MODELS) if args.tiny else models)
    else:
        cells = tiny_matrix() if args.tiny else full_matrix(models)
    steps = args.steps or (1 if args.tiny else 3 if args.quick else 6)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1 if args.quick else 2)
    out = args.json or BENCHMARKS / f"gpu-results{'-quick' * args.quick}{'-tiny' * args.tiny}.json"
    name = describe_device(device)
    found = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (
        lookup_peak(name) if device.type == "cuda" else None)
    peak, peak_source = found or (None, None)
    weights = torch.float16 if device.type == "cuda" else torch.float32

    started = time.perf_counter()
    with webui_runtime():
        rows = run_matrix(cells, specs, device, weights, steps, warmup, peak, started + 60 * args.max_minutes,
                          estimate=not args.no_estimate)

    result = {
        "tiny": args.tiny, "quick": args.quick, "device": name, "torch": torch.__version__,
        "lycoris_lora": metadata.version("lycoris-lora"), "weights_dtype": str(weights).replace("torch.", ""),
        "train_dtype": "fp16" if weights == torch.float16 else "fp32",
        "attention": "torch SDPA, memory-efficient kernel off (the WebUI's default sdp-no-mem)",
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "peak_vram": "torch.cuda.max_memory_allocated per cell" if device.type == "cuda" else
                     "not measured on the CPU (null)",
        "estimate": "lohatrain.memory.estimate per cell, made before it (GB of 1e9 bytes, as peak_vram_gb)",
        "steps": steps, "warmup_steps": warmup, "seconds": round(time.perf_counter() - started, 1), "rows": rows,
    }
    print(f"device: {name}; torch {torch.__version__}; lycoris-lora {result['lycoris_lora']}; weights "
          f"{result['weights_dtype']}, train {result['train_dtype']}; per cell {warmup + 1} untimed steps, "
          f"then {steps} timed")
    print(f"dense fp16 peak: {f'{peak:g} TFLOPS ({peak_source})' if peak else 'n/a (unknown card: --peak-tflops)'}")
    print(table(rows))
    if device.type != "cuda":
        print("peak GB: not measured on the CPU")
    skipped = sum(r["status"] == "skipped" for r in rows)
    if skipped:
        print(f"{skipped} cells skipped: the run reached --max-minutes {args.max_minutes:g}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
