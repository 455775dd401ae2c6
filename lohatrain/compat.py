"""The one place that knows which torch lohatrain runs on: the stock WebUI's 2.1.2 up to the newest.

A stock AUTOMATIC1111 v1.10.1 installs torch 2.1.2; users of newer cards run 2.7 or later in the same WebUI.
Each function here takes the newer API where it exists (its version named) and the older spelling before it,
so the rest of the package calls one name on every torch.
"""
from __future__ import annotations

import re
import weakref

import torch

MIN_TORCH = (2, 1)  # float8 weights (the WebUI's FP8 option), checkpoint(use_reentrant=False), SDPA
TORCH_VERSION = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())

# The WebUI's FP8 weight option stores Linear and Conv2d weights as float8_e4m3fn (torch 2.1 added float8).
FP8_DTYPES = frozenset(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))

# torch.OutOfMemoryError (2.5) is an alias of this one, which every supported torch has.
OutOfMemoryError = torch.cuda.OutOfMemoryError


def torch_too_old() -> str | None:
    """One line saying what to do when this torch is older than lohatrain supports, else None."""
    if TORCH_VERSION >= MIN_TORCH:
        return None
    return (f"lohatrain needs torch {'.'.join(map(str, MIN_TORCH))} or later, and this WebUI runs torch "
            f"{torch.__version__}: update the WebUI (v1.10 installs torch 2.1.2)")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs ops in on this device type at this moment, or None when it is off."""
    if TORCH_VERSION >= (2, 4):  # the device-generic spellings
        if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return None


def autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch.autocast on this device type runs ops in `dtype` (it silently turns itself off when not).

    CUDA: fp16 and bf16 on every supported torch. CPU: bf16 always; fp16 from torch 2.3 on, the first with
    both CPU fp16 autocast and a CPU GradScaler (fp16 training needs loss scaling).
    """
    if dtype == torch.float32:
        return True
    if device_type == "cuda":
        return dtype in (torch.float16, torch.bfloat16)
    if device_type == "cpu":
        return dtype == torch.bfloat16 or (dtype == torch.float16 and TORCH_VERSION >= (2, 3))
    return False


def grad_scaler(device_type: str, enabled: bool):
    """A GradScaler for fp16 training. torch.amp.GradScaler(device) is 2.3+; before it only CUDA had one
    (autocast_supports refuses CPU fp16 there), and a disabled scaler passes the loss and step through."""
    if TORCH_VERSION >= (2, 3):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def fake_mode():
    """torch's FakeTensorMode (tensors with a shape, dtype and device but no memory), taking real tensors in.

    Newer torch (2.13 here; 2.1 does not) remembers each fake an op makes through a weak reference
    (`meta_converter.tensor_memo`), and `nn.Module.to()`/`.float()` refuse to convert a fake parameter that has
    one (`torch.utils.swap_tensors`). That memory is made a plain dict, which `forget_fakes` empties after every
    op: nothing then holds a weak (or, past its op, a strong) reference to a fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    converter = getattr(mode.fake_tensor_converter, "meta_converter", None)
    if isinstance(getattr(converter, "tensor_memo", None), weakref.WeakValueDictionary):
        converter.tensor_memo = {}
    return mode


def forget_fakes(mode) -> None:
    """Empty what `fake_mode()` remembered of the fakes made so far (see there)."""
    memo = getattr(getattr(mode.fake_tensor_converter, "meta_converter", None), "tensor_memo", None)
    if type(memo) is dict:
        memo.clear()


def fused_adamw_supported(device_type: str) -> bool:
    """AdamW's fused kernel: CUDA on every supported torch, the CPU from 2.4 on."""
    return device_type == "cuda" or (device_type == "cpu" and TORCH_VERSION >= (2, 4))
