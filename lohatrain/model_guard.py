"""Leave the host's model exactly as we found it, whatever happens during training.

Training never writes a base weight (the LoHa lives beside the model), so what can change is state around
the weights: `requires_grad` (we freeze), train/eval flags, forwards we route through the LoHa or through
gradient checkpointing, ldm's own checkpoint flags, and devices (the VAE and text encoder leave the GPU).
`ModelGuard` records all of it on entry and puts every bit back on exit, finished, interrupted or failed.

Weights made under `torch.inference_mode` (Forge loads every model so, and moves models so) cannot take part in a
backward pass. `make_ordinary` swaps them, for the run, for ordinary copies, and keeps the originals aside (in
CPU memory, so the run does not hold two copies on the GPU); on exit the very same tensor objects go back where they
were, still inference tensors. Whatever touches an inference tensor on exit does it inside inference mode, as
outside it torch refuses `requires_grad_` and a move would turn the tensor into an ordinary one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import LohatrainError

# ldm's blocks checkpoint through their own autograd function, which only differentiates the block's own
# parameters: the LoHa weights would silently get no gradient. These flags are turned off while training.
_LDM_CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")


class ModelGuard:
    def __init__(self, *roots: nn.Module, offload_device: str | torch.device = "cpu"):
        self.roots = [r for r in roots if isinstance(r, nn.Module)]
        self.offload_device = torch.device(offload_device)
        self.originals: dict[tuple[int, str, str], tuple[nn.Module, torch.Tensor, torch.device]] = {}

    def make_ordinary(self, root: nn.Module) -> None:
        """Swap each inference tensor under `root` for an ordinary copy (again for any that became one since:
        a host's memory manager moving the model under inference mode does that); the first original is kept."""
        for module in root.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in list(getattr(module, kind).items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    copy = tensor.detach().clone()
                    key = (id(module), kind, name)
                    if key not in self.originals:
                        self.originals[key] = (module, tensor, tensor.device)
                        with torch.inference_mode():
                            tensor.data = tensor.data.to(self.offload_device)
                    getattr(module, kind)[name] = nn.Parameter(copy, requires_grad=False) if kind == "_parameters" else copy

    def __enter__(self) -> "ModelGuard":
        self.modules = list({id(m): m for r in self.roots for m in r.modules()}.values())
        self.training = [m.training for m in self.modules]
        self.forwards = [m.__dict__.get("forward") for m in self.modules]
        self.flags = [{f: m.__dict__[f] for f in _LDM_CHECKPOINT_FLAGS if f in m.__dict__} for m in self.modules]
        self.tensors = [(m, kind, name, t.device, t.dtype, t.requires_grad)
                        for m in self.modules for kind in ("_parameters", "_buffers")
                        for name, t in getattr(m, kind).items() if t is not None]
        return self

    def disable_ldm_checkpointing(self) -> None:
        for m in self.modules:
            for flag in _LDM_CHECKPOINT_FLAGS:
                if isinstance(m.__dict__.get(flag), bool):
                    setattr(m, flag, False)

    def __exit__(self, *exc) -> None:
        """Put back every part, carrying on past a part that fails (say, out of memory while moving the VAE
        back to the GPU), then name exactly what could not be put back."""
        failed: list[str] = []
        names = {id(m): name for r in self.roots for name, m in r.named_modules()}
        for (_, kind, name), (module, original, device) in self.originals.items():
            with torch.inference_mode():
                original.data = original.data.to(device)
            getattr(module, kind)[name] = original

        def attempt(what: str, module: nn.Module, restore) -> None:
            try:
                restore()
            except Exception as e:  # noqa: BLE001 — reported below, with every other part that failed
                failed.append(f"{what} of {names.get(id(module)) or type(module).__name__} ({type(e).__name__}: {e})")

        for m, training, forward, flags in zip(self.modules, self.training, self.forwards, self.flags):
            attempt("the train/eval mode", m, lambda m=m, training=training: setattr(m, "training", training))
            attempt("the forward", m, lambda m=m, forward=forward: _put_forward(m, forward))
            m.__dict__.update(flags)
        for m, kind, name, device, dtype, requires_grad in self.tensors:
            attempt(name, m, lambda m=m, kind=kind, name=name, device=device, dtype=dtype, rg=requires_grad:
                    _put_tensor(m, kind, name, device, dtype, rg))
        if failed:
            shown = "; ".join(failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else "")
            raise LohatrainError(
                f"training ended, but {len(failed)} part(s) of the loaded model could not be put back as they were: "
                f"{shown}. Reload the checkpoint (choose it again in the checkpoint list) before generating.")


def _put_forward(module: nn.Module, forward) -> None:
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


def _put_tensor(module: nn.Module, kind: str, name: str, device, dtype, requires_grad: bool) -> None:
    tensor = getattr(module, kind)[name]
    with torch.inference_mode() if tensor.is_inference() else contextlib.nullcontext():
        if tensor.device != device or tensor.dtype != dtype:
            if kind == "_parameters":
                tensor.data = tensor.data.to(device, dtype)
            else:
                module._buffers[name] = tensor.to(device, dtype)
        if kind == "_parameters" and tensor.requires_grad != requires_grad:
            tensor.requires_grad_(requires_grad)
