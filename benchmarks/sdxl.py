"""SDXL figures without a GPU: FLOPs and a memory estimate of one training step at 1024 px, batch 1.

    .venv/bin/python benchmarks/sdxl.py [--preset highest] [--no-checkpointing]

Prints one `name: value` per line. Everything runs on the meta device (shapes only: no weights, no memory,
seconds), on a full-size SDXL base UNet (`lohatrain.demo_sdxl.FULL_SDXL`, 2,567,463,684 parameters, as
sd_xl_base.yaml builds it) with the preset's LoHa attached as the trainer attaches it.

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions, forward and backward).
- Memory, in fp16 as trained on a GPU: the UNet's weights (exact: parameters x 2 bytes), the LoHa's training
  state (exact: fp32 parameters, gradients and AdamW's two moments, 16 bytes per parameter), and the peak of
  the tensors a step creates (activations, saved tensors, ΔW, gradients), tracked with a dispatch mode that
  adds each new tensor's bytes and subtracts them when it is freed. Attention is counted two ways: ldm's own
  (it stores the scores: an upper bound), and fused, as the WebUI runs it on a GPU (SDPA or xformers keep
  only the output and a log-sum-exp per query; on the meta device torch's SDPA takes its unfused path, so the
  fused kernel's allocations are written out by hand). The VAE and both text encoders are off the GPU while the
  UNet trains (cached latents and captions), so they do not count. CUDA's own context (~0.3-0.5 GB) and
  allocator slack do not show here: this is an estimate, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

with contextlib.redirect_stdout(sys.stderr):  # ldm prints notices at import; stdout carries only figures
    import lohatrain.ldm_importable  # noqa: F401  (first: sets up ldm's imports)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from lohatrain import loop  # noqa: E402
from lohatrain.demo_sdxl import FULL_SDXL, build_unet, conditioning_widths  # noqa: E402
from lohatrain.families.sdxl import SDXL  # noqa: E402
from lohatrain.methods import TYPES  # noqa: E402
from lohatrain.network import Network, count_parameters, plan_unet  # noqa: E402
from lohatrain.sgm_standin import SDXLUNet  # noqa: E402

SDXL_PRESETS = TYPES["loha"].presets["sdxl"]  # LoHa's, the default type

GB = 1e9


def emit(name: str, value) -> None:
    print(f"{name}: {value}", flush=True)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors created inside it that are still alive, and their peak. A view or an in-place
    result shares its input's storage and is not counted again."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in inputs and not t._is_view():
                size = t.untyped_storage().nbytes()
                self.live += size
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, size)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


class _FusedAttentionMemory(torch.autograd.Function):
    """What a fused attention kernel (flash / memory-efficient SDPA) allocates, without its arithmetic: the
    output and a float32 log-sum-exp per query, saved for backward; q, k, v gradients in backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def fused_attention_forward(self, x, context=None, mask=None):
    """ldm's CrossAttention with fused attention, as the WebUI's SDPA optimisation replaces its forward."""
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
    out = _FusedAttentionMemory.apply(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


def sdxl_unet_on_meta(dtype: torch.dtype = torch.float16) -> SDXLUNet:
    import ldm.modules.attention

    ldm.modules.attention._ATTN_PRECISION = "fp16"  # its fp32 path relies on CUDA autocast, absent on meta
    with torch.device("meta"):
        unet = build_unet(FULL_SDXL)
    unet.to(dtype).requires_grad_(False)
    for m in unet.modules():  # as ModelGuard.disable_ldm_checkpointing
        for flag in ("checkpoint", "use_checkpoint"):
            if isinstance(m.__dict__.get(flag), bool):
                setattr(m, flag, False)
    return unet


def step_inputs(batch: int, resolution: int, dtype: torch.dtype):
    latent = resolution // 8
    crossattn, vector = conditioning_widths(FULL_SDXL)
    return (torch.empty(batch, 4, latent, latent, device="meta", dtype=dtype),
            torch.zeros(batch, dtype=torch.long, device="meta"),
            torch.empty(batch, 77, crossattn, device="meta", dtype=dtype),
            torch.empty(batch, vector, device="meta", dtype=dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="highest", choices=list(SDXL_PRESETS))
    parser.add_argument("--no-checkpointing", action="store_true", help="without gradient checkpointing")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    preset = SDXL_PRESETS[args.preset]
    checkpointing = not args.no_checkpointing
    emit("mode", f"full-size SDXL base UNet on meta, {args.resolution} px, batch {args.batch}, fp16, "
                 f"preset {args.preset}, gradient checkpointing {'on' if checkpointing else 'off'}")
    unet = sdxl_unet_on_meta()
    weights = sum(p.numel() for p in unet.parameters())
    plans = plan_unet(SDXL, unet, preset.dim, preset.alpha, preset.conv_dim, preset.conv_alpha)
    loha = count_parameters(plans)
    emit("unet_parameters", weights)
    emit("loha_layers", len(plans))
    emit("loha_parameters", loha)
    emit("loha_fp16_file_mb", round(loha * 2 / 1e6, 1))
    x, t, context, y = step_inputs(args.batch, args.resolution, torch.float16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context=context, y=y)
    forward = counter.get_total_flops()
    emit("forward_tflops", round(forward / 1e12, 2))

    with torch.device("meta"):
        network = Network(plans, seed=0)
    network.attach()
    if checkpointing:
        loop.checkpoint_blocks(unet)

    def step():
        out = unet(x, t, context=context, y=y)
        F.mse_loss(out.float(), torch.empty_like(out, dtype=torch.float32)).backward()

    with FlopCounterMode(display=False) as counter:
        step()
    emit("training_step_tflops", round(counter.get_total_flops() / 1e12, 2))
    emit("training_step_over_forward", round(counter.get_total_flops() / forward, 2))
    import ldm.modules.attention

    peaks = {}
    for attention in ("ldm", "fused"):
        for p in network.parameters():
            p.grad = None
        with contextlib.ExitStack() as stack:
            if attention == "fused":
                cls = ldm.modules.attention.CrossAttention
                stack.callback(setattr, cls, "forward", cls.forward)
                cls.forward = fused_attention_forward
            with LiveBytes() as tracker:
                step()
        peaks[attention] = tracker.peak / GB
    network.detach()
    weights_gb, state_gb = weights * 2 / GB, loha * 16 / GB
    emit("unet_fp16_weights_gb", round(weights_gb, 2))
    emit("loha_training_state_gb", round(state_gb, 2))
    emit("step_tensors_peak_gb_ldm_attention", round(peaks["ldm"], 2))
    emit("step_tensors_peak_gb_fused_attention", round(peaks["fused"], 2))
    emit("estimated_peak_gb_ldm_attention", round(weights_gb + state_gb + peaks["ldm"], 2))
    emit("estimated_peak_gb", round(weights_gb + state_gb + peaks["fused"], 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
