"""Engine benchmarks: step time, memory and overhead on the tiny model; FLOPs on a full-size SD1.5 UNet.

    .venv/bin/python benchmarks/engine.py                    seconds/step, peak memory, share outside the UNet
    .venv/bin/python benchmarks/engine.py --flops            FLOPs of a training step on a meta-device SD1.5 UNet
    .venv/bin/python benchmarks/engine.py --compare-forward  merged vs two-op forward, per training dtype

Prints one `name: value` per line, plain text. It measures; it asserts nothing about speed.

Default mode (timing). The tiny demo model (`lohatrain.demo.build_tiny_sd1`) trains on the demo dataset with the
demo's settings (64 px, batch 2, "small" preset) in fp32 for `--steps` steps (30). Each step is the time
between two consecutive "Training" progress reports; `seconds_per_step` is the median over the steps after a
warm-up. The UNet's own share of a step is timed with hooks, without touching lohatrain's code:

- forward: a forward pre-hook and a forward hook on `model.model.diffusion_model` (calls under no_grad, i.e.
  previews, are ignored);
- backward: the forward hook puts a tensor hook on the UNet's output; it fires when the gradient of that
  output is ready, i.e. when backward reaches the UNet (only the loss's few element-wise ops come before it).
  That hook queues a callback on the autograd engine (`Variable._execution_engine.queue_callback`, what DDP and
  FSDP use), which runs when the whole backward pass is done. Nothing that needs a gradient feeds the UNet's
  inputs, so everything between those two points is the UNet's backward: the LoHa's ΔW backward, the LoHa
  gradients and (with gradient checkpointing) the recomputed forward included.

On CUDA each time stamp synchronises the device first. `outside_unet_share` is the median over the timed steps
of (step - UNet forward - UNet backward) / step: batching, noise, loss, optimizer, scheduler and reporting.
CPU threads: OpenMP threads spin-wait, so when another process is busy on this machine a multi-threaded run
can be many times slower and very noisy; `--threads 1` gives stable figures on a shared machine.

`--flops`: a full-size SD1.5 UNet (v1-inference.yaml) built on the meta device (no weights, no memory); FLOPs
counted with `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and their backward: what
costs time on a GPU; element-wise ops are not counted).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

with contextlib.redirect_stdout(sys.stderr):  # ldm prints notices at import; stdout carries only figures
    import lohatrain.ldm_importable  # noqa: E402,F401  (first: installs the torchvision stand-in that ldm's import needs)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lohatrain.families import ldm_parts  # noqa: E402
from lohatrain import loop, trainer  # noqa: E402
from lohatrain.trainer import Hooks  # noqa: E402
from lohatrain.__main__ import demo_settings  # noqa: E402
from lohatrain.demo import build_tiny_sd1, make_sample_dataset  # noqa: E402
from lohatrain.families.sd1 import SD1  # noqa: E402
from lohatrain.methods import TYPES  # noqa: E402
from lohatrain import network as network_module  # noqa: E402
from lohatrain.network import Network, count_parameters, plan_unet  # noqa: E402
from lohatrain.settings import TrainSettings  # noqa: E402

PRESETS = TYPES["loha"].presets["sd1"]  # LoHa's, the default type

# The `unet_config.params` of SD1.5's v1-inference.yaml.
SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
                 num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)


def emit(name: str, value) -> None:
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    print(f"{name}: {value}", flush=True)


# --------------------------------------------------------------------------------------------- timing (default)

class UNetTimer:
    """Seconds spent in the UNet's forward and backward, per training step (see the module docstring)."""

    def __init__(self, unet: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.forward = 0.0  # UNet forward seconds since the last `take()`
        self.backward = 0.0  # UNet backward seconds since the last `take()`
        self._fwd_start = None
        self._bwd_start = None
        self._handles = [unet.register_forward_pre_hook(self._pre), unet.register_forward_hook(self._post)]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        self._fwd_start = self._now() if torch.is_grad_enabled() else None

    def _post(self, module, args, output):
        if self._fwd_start is None:
            return
        self.forward += self._now() - self._fwd_start
        self._fwd_start = None
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._grad_ready)

    def _grad_ready(self, grad):
        self._bwd_start = self._now()
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)

    def _backward_done(self):
        if self._bwd_start is not None:
            self.backward += self._now() - self._bwd_start
            self._bwd_start = None

    def take(self) -> tuple[float, float]:
        taken = self.forward, self.backward
        self.forward = self.backward = 0.0
        return taken

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def timing_settings(dataset: Path, out: Path, steps: int, preset: str, checkpointing: bool, dtype: str = "fp32",
                    learning_rate: float | None = None, method: str = "loha"):
    s = dataclasses.replace(demo_settings(dataset, out), training_method=method).with_preset(preset)
    return dataclasses.replace(s, steps=steps, train_dtype=dtype, gradient_checkpointing=checkpointing,
                               learning_rate=learning_rate or s.learning_rate)


def run_timed(model, settings, device: torch.device, on_step=None) -> dict:
    """Train once with the UNet timer on; per-step wall seconds and UNet seconds."""
    unet = SD1.unet(model)
    timer = UNetTimer(unet, device)
    step_s, fwd_s, bwd_s, last = [], [], [], [time.perf_counter()]

    def on_progress(p):
        now = time.perf_counter() if device.type != "cuda" else timer._now()
        if p.stage == "Training":
            step_s.append(now - last[0])
            fwd, bwd = timer.take()
            fwd_s.append(fwd)
            bwd_s.append(bwd)
        else:
            timer.take()
        last[0] = now

    try:
        result = trainer.train(ldm_parts(model), settings, Hooks(progress=on_progress, on_step=on_step))
    finally:
        timer.remove()
    return {"result": result, "step_s": step_s, "fwd_s": fwd_s, "bwd_s": bwd_s}


def timed_figures(run: dict, warmup: int) -> dict:
    if len(run["step_s"]) <= warmup:
        warmup = 0
    steps, fwd, bwd = run["step_s"][warmup:], run["fwd_s"][warmup:], run["bwd_s"][warmup:]
    unet = [f + b for f, b in zip(fwd, bwd)]
    return {
        "seconds_per_step": statistics.median(steps),
        "unet_forward_seconds_per_step": statistics.median(fwd),
        "unet_backward_seconds_per_step": statistics.median(bwd),
        "unet_seconds_per_step": statistics.median(unet),
        "outside_unet_seconds_per_step": statistics.median(s - u for s, u in zip(steps, unet)),
        "outside_unet_share": statistics.median((s - u) / s for s, u in zip(steps, unet)),
        "timed_steps": len(steps),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cmd_timing(args, device: torch.device) -> None:
    steps = args.steps or 30
    warmup = min(5, steps // 3)
    with tempfile.TemporaryDirectory(prefix="lohatrain-bench-") as tmp:
        dataset = make_sample_dataset(Path(tmp) / "images")
        model = build_tiny_sd1().to(device)
        settings = timing_settings(dataset, Path(tmp) / "out", steps, args.preset, args.gradient_checkpointing,
                                   method=args.method)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run = run_timed(model, settings, device)
        figures = timed_figures(run, warmup)
    emit("mode", "timing (tiny demo model)")
    emit("device", describe_device(device))
    emit("torch_threads", torch.get_num_threads())
    emit("load_average_1min", round(os.getloadavg()[0], 2))
    emit("preset", args.preset)
    emit("gradient_checkpointing", settings.gradient_checkpointing)
    emit("train_dtype", settings.train_dtype)
    emit("steps", steps)
    emit("warmup_steps", warmup)
    for key in ("timed_steps", "unet_forward_seconds_per_step", "unet_backward_seconds_per_step",
                "unet_seconds_per_step", "outside_unet_seconds_per_step"):
        emit(key, figures[key])
    if device.type == "cpu":
        emit("peak_memory_before_training_mb", rss_before)
        emit("peak_memory_kind", "process max RSS (CPU)")
    else:
        emit("peak_memory_kind", "torch.cuda.max_memory_allocated during training")
    emit("final_loss_mean_last_10", statistics.fmean(run["result"].losses[-10:]))
    emit("seconds_per_step", figures["seconds_per_step"])
    emit("peak_memory_mb", peak_memory_mb(device))
    emit("outside_unet_share", figures["outside_unet_share"])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------------ --compare-forward

@contextlib.contextmanager
def forward_style(two_op: bool):
    """Benchmark only: with `two_op`, each adapted layer runs as lycoris-lora's own modules run it (LoConModule,
    LohaModule, LokrModule.forward: the base op, then a second full-size op with the type's ΔW, added), instead
    of lohatrain's one merged op. lohatrain's own code is not changed: its forward factory is swapped for the run."""
    original = network_module._merged_forward

    def lycoris_style(module, network, index):
        def forward(x):
            linear = network.plans[index].linear
            base = network_module._op(module, linear, x, module.weight, module.bias)
            delta = network.merged_delta(index, module.weight).to(base.dtype)
            return base + network_module._op(module, linear, x.to(base.dtype), delta, None)

        return forward

    if two_op:
        network_module._merged_forward = lycoris_style
    try:
        yield
    finally:
        network_module._merged_forward = original


@torch.no_grad()
def denoising_loss(model, dataset: Path, seed: int = 0) -> float:
    """Mean noise-prediction error on the dataset's images over fixed noise and timesteps (the measure of
    tests/runs.py). fp32, or fp16 autocast when the UNet's weights are fp16."""
    from lohatrain import dataset as ds

    device = next(SD1.unet(model).parameters()).device
    half = next(SD1.unet(model).parameters()).dtype == torch.float16
    items = ds.scan_dataset(dataset, "txt")
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.autocast(device.type, dtype=torch.float16, enabled=half):
        for item in items:
            pixels, _ = ds.prepare_image(ds.load_image(item.path), (64, 64))
            latent = model.get_first_stage_encoding(model.encode_first_stage(pixels[None].to(device))).float()
            cond = model.get_learned_conditioning([item.caption])
            for t in (100, 400, 700):
                noise = torch.randn(latent.shape, generator=gen).to(device)
                ac = model.alphas_cumprod[t].float()
                noisy = ac.sqrt() * latent + (1 - ac).sqrt() * noise
                pred = model.apply_model(noisy, torch.tensor([t], device=device), cond)
                total += torch.mean((pred.float() - noise) ** 2).item()
    return total / (3 * len(items))


def fp16_unet_weights(model):
    """Emulates a half-precision base model on the CPU: the UNet's Linear and Conv weights in fp16 (what
    LoHa merges into), norms left in fp32. A plain `model.half()` does not run on the CPU: ldm's GroupNorm32
    upcasts its input to fp32, and the CPU group_norm refuses fp16 parameters with an fp32 input."""
    for m in SD1.unet(model).modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.half()
    return model


@torch.no_grad()
def merge_rounding(network) -> dict[str, float]:
    """How much of the trained ΔW survives being merged into W in bf16 / fp16: per layer, the relative error
    ||(W+ΔW)_low - W_low - ΔW|| / ||ΔW|| (median over layers), and ||ΔW|| / ||W||."""
    ratios, errors = [], {"bf16": [], "fp16": []}
    for plan, adapter in zip(network.plans, network.adapters):
        w = plan.module.weight.float()
        delta = adapter.delta().float().reshape(w.shape)
        ratios.append((delta.norm() / w.norm()).item())
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            kept = (w + delta).to(dtype).float() - w.to(dtype).float()
            errors[name].append(((kept - delta).norm() / delta.norm()).item())
    return {"delta_weight_over_weight_norm_median": statistics.median(ratios),
            **{f"{k}_merge_delta_weight_error_median": statistics.median(v) for k, v in errors.items()}}


def cmd_compare_forward(args, device: torch.device) -> None:
    steps = args.steps or 60
    warmup = min(5, steps // 3)
    emit("mode", "compare-forward (tiny demo model, merged W+dW vs lycoris-style two ops)")
    emit("device", describe_device(device))
    emit("torch_threads", torch.get_num_threads())
    emit("steps", steps)
    emit("learning_rate", args.learning_rate)
    emit("preset", args.preset)
    # (train dtype, base weights): "fp16-base" tries model.half(); "fp16-weights" is the CPU emulation
    cases = [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "fp32"), ("fp16", "fp16-base"), ("fp16", "fp16-weights")]
    with tempfile.TemporaryDirectory(prefix="lohatrain-bench-") as tmp:
        dataset = make_sample_dataset(Path(tmp) / "images")
        emit("untrained_denoising_loss", denoising_loss(build_tiny_sd1().to(device), dataset))
        for dtype, base in cases:
            suffix = {"fp32": "", "fp16-base": "_fp16base", "fp16-weights": "_fp16weights"}[base]
            if base == "fp16-weights":
                emit(f"{dtype}{suffix}_untrained_denoising_loss",
                     denoising_loss(fp16_unet_weights(build_tiny_sd1().to(device)), dataset))
            for two_op in (False, True):
                name = f"{dtype}{suffix}_{'two_op' if two_op else 'merged'}"
                model = build_tiny_sd1().to(device)
                if base == "fp16-base":
                    model = model.half()
                elif base == "fp16-weights":
                    model = fp16_unet_weights(model)
                settings = timing_settings(dataset, Path(tmp) / "out", steps, args.preset, False, dtype,
                                           args.learning_rate)
                final = {}

                def on_step(step, network, _final=final, _model=model):
                    if step == steps:
                        _final["loss"] = denoising_loss(_model, dataset)
                        _final["rounding"] = merge_rounding(network)

                try:
                    with forward_style(two_op):
                        run = run_timed(model, settings, device, on_step=on_step)
                except Exception as e:  # report and go on: CPU fp16 paths may be missing
                    emit(f"{name}_error", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                losses = run["result"].losses
                emit(f"{name}_mean_loss_last_20", statistics.fmean(losses[-20:]))
                emit(f"{name}_final_denoising_loss", final.get("loss", float("nan")))
                emit(f"{name}_seconds_per_step", timed_figures(run, warmup)["seconds_per_step"])
                if (dtype, base, two_op) == ("fp32", "fp32", False):
                    for key, value in final.get("rounding", {}).items():
                        emit(f"{name}_{key}", value)


# ------------------------------------------------------------------------------------------------- --flops

def sd15_unet_on_meta() -> torch.nn.Module:
    """SD1.5's UNet, full size, on the meta device: shapes only, built in milliseconds."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"), contextlib.redirect_stdout(sys.stderr):
        return UNetModel(**SD15_UNET)


def preset_plans(unet, preset):
    return plan_unet(SD1, unet, preset.dim, preset.alpha, preset.conv_dim, preset.conv_alpha)


def preset_file_mb(unet, preset, method: str = "loha") -> tuple[int, float]:
    """(numbers in the file incl. alpha scalars, fp16 file size in MB = numbers x 2 bytes / 1e6) on this UNet."""
    params = count_parameters(preset_plans(unet, preset), method, preset.factor)
    return params, params * 2 / 1e6


def _count(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _inputs(batch: int):
    x = torch.empty(batch, 4, 64, 64, device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    context = torch.empty(batch, 77, 768, device="meta")
    return x, t, context


def training_step_flops(preset, two_op: bool, checkpointing: bool, batch: int = 1,
                        delta_as_leaf: bool = False, method: str = "loha") -> int:
    """FLOPs of one forward+backward of the UNet with a network of `method` at `preset` attached as lohatrain
    attaches it (or, `two_op`, run as lycoris-lora's own modules run it). `delta_as_leaf`: each layer's ΔW is
    a ready-made tensor that takes a gradient instead of being built from the type's factors, to tell the cost
    of building ΔW (forward, backward and, with checkpointing, its recomputation) from the cost of applying it:
    the merged floor."""
    unet = sd15_unet_on_meta()
    for p in unet.parameters():
        p.requires_grad_(False)
    for m in unet.modules():  # as ModelGuard.disable_ldm_checkpointing: ldm's own checkpoint drops LoHa grads
        for flag in ("checkpoint", "use_checkpoint"):
            if isinstance(m.__dict__.get(flag), bool):
                setattr(m, flag, False)
    with torch.device("meta"):
        network = Network(preset_plans(unet, preset), seed=0, method=method, factor=preset.factor)
    if delta_as_leaf:
        for adapter in network.adapters:
            leaf = torch.empty(adapter.shape, device="meta", requires_grad=True)
            adapter.delta = lambda _leaf=leaf: _leaf
    with forward_style(two_op):
        network.attach()
    if checkpointing:
        loop.checkpoint_blocks(unet)
    x, t, context = _inputs(batch)

    def step():
        out = unet(x, t, context=context)
        F.mse_loss(out.float(), torch.empty_like(out, dtype=torch.float32)).backward()

    total = _count(step)
    if not delta_as_leaf:
        missing = sum(p.grad is None for p in network.parameters())
        if missing:
            raise RuntimeError(f"{missing} network parameters got no gradient")
    network.detach()
    return total


def cmd_flops(args) -> None:
    emit("mode", "flops (full-size SD1.5 UNet on the meta device, 512 px: latent 64x64, context 1x77x768)")
    unet = sd15_unet_on_meta()
    emit("unet_parameters", sum(p.numel() for p in unet.parameters()))
    for name, preset in PRESETS.items():
        params, mb = preset_file_mb(unet, preset)
        emit(f"preset_{name}_layers", len(preset_plans(unet, preset)))
        emit(f"preset_{name}_loha_parameters", params)
        emit(f"preset_{name}_fp16_file_mb", round(mb, 2))
        emit(f"preset_{name}_settings_sd15_file_mb", preset.file_mb)

    x, t, context = _inputs(1)
    with torch.no_grad():
        forward = _count(lambda: unet(x, t, context=context))
    emit("plain_forward_gflops", forward / 1e9)

    preset = PRESETS["highest"]
    cases = {
        "merged": (False, False),
        "two_op": (True, False),
        "merged_checkpointing": (False, True),
        "two_op_checkpointing": (True, True),
    }
    ratios = {}
    for name, (two_op, checkpointing) in cases.items():
        total = training_step_flops(preset, two_op, checkpointing)
        applying = training_step_flops(preset, two_op, checkpointing, delta_as_leaf=True)
        ratios[name] = total / forward
        emit(f"step_{name}_gflops", total / 1e9)
        emit(f"step_{name}_building_delta_weight_gflops", (total - applying) / 1e9)
        emit(f"step_{name}_over_forward_without_building_delta_weight", round(applying / forward, 3))
        emit(f"step_{name}_over_forward", round(total / forward, 3))
    # Every type at its own "highest" preset, at the default batch size (ΔW is built once per step whatever
    # the batch, so its share shrinks as the batch grows): ours, lycoris-lora's own two-op forward, and the
    # merged floor (ΔW given, only applied) that ours should stay within 5% of.
    batch = TrainSettings().batch_size
    emit("per_type_batch", batch)
    for method, kind in TYPES.items():
        typed = kind.presets["sd1"]["highest"]
        emit(f"{method}_highest_fp16_file_mb", round(preset_file_mb(unet, typed, method)[1], 2))
        ours = training_step_flops(typed, False, False, batch=batch, method=method)
        lycoris = training_step_flops(typed, True, False, batch=batch, method=method)
        floor = training_step_flops(typed, False, False, batch=batch, method=method, delta_as_leaf=True)
        emit(f"{method}_step_over_forward", round(ours / (forward * batch), 3))
        emit(f"{method}_lycoris_forward_step_over_forward", round(lycoris / (forward * batch), 3))
        emit(f"{method}_step_over_merged_floor", round(ours / floor, 4))
    ours = training_step_flops(preset, False, False, batch=batch)
    emit("two_op_over_merged", round(ratios["two_op"] / ratios["merged"], 3))
    emit("step_flops_over_forward_batch", batch)
    emit("step_flops_over_forward", f"{ours / (forward * batch):.2f}")


# --------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flops", action="store_true", help="FLOPs of a training step on a meta SD1.5 UNet")
    parser.add_argument("--compare-forward", action="store_true", help="merged vs two-op forward, per dtype")
    parser.add_argument("--steps", type=int, help="training steps (default 30; 60 with --compare-forward)")
    parser.add_argument("--preset", default="small", choices=list(PRESETS), help="network size (default: demo's)")
    parser.add_argument("--method", default="loha", choices=list(TYPES), help="timing mode: network type")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="timing mode: checkpoint UNet blocks")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="--compare-forward (default 3e-3)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--checkpoint", help="a real model checkpoint (not supported: needs the WebUI)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    if args.checkpoint:
        emit("checkpoint", "skipped: lohatrain has no checkpoint loader of its own; timing on a real checkpoint "
                           "needs the WebUI (train from its LoHa tab)")
        if not (args.flops or args.compare_forward):
            return 0
    if args.compare_forward:
        cmd_compare_forward(args, device)
    elif not args.flops:
        cmd_timing(args, device)
    if args.flops:
        cmd_flops(args)  # last: its last line is `step_flops_over_forward: X`
    return 0


if __name__ == "__main__":
    sys.exit(main())
