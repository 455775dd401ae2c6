"""Leave the host's model exactly as we found it, whatever happens during training.

Training never writes a base weight (the LoHa lives beside the model), so what can change is state around
the weights: `requires_grad` (we freeze), train/eval flags, forwards we route through the LoHa or through
gradient checkpointing, ldm's own checkpoint flags, and devices (the VAE and text encoder leave the GPU).
`ModelGuard` records all of it on entry and puts every bit back on exit, finished, interrupted or failed.

Weights made under `torch.inference_mode` (Forge loads every model so, and moves models so) cannot take part in a
backward pass. `make_ordinary` puts, for the run, an ordinary tensor in each one's place that views the very same
memory (training never writes a base weight, so sharing it is safe): no second copy of the model, on the GPU or in
CPU memory. On exit the host's own tensor objects go back, still inference tensors, over whatever memory the host
last moved the weights to. Whatever touches an inference tensor on exit does it inside inference mode, as outside it
torch refuses `requires_grad_` and a move would turn the tensor into an ordinary one.
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
    def __init__(self, *roots: nn.Module):
        self.roots = [r for r in roots if isinstance(r, nn.Module)]
        # (module, "_parameters" or "_buffers", name) -> the host's own inference tensor that was there
        self.originals: dict[tuple[int, str, str], tuple[nn.Module, torch.Tensor]] = {}

    def make_ordinary(self, root: nn.Module) -> None:
        """Put an ordinary view of each inference tensor under `root` in its place (again for any that became one
        since: a host's memory manager moving the model under inference mode does that). The host's tensor objects
        hold no memory meanwhile, so a move by the host frees the old memory (the GPU's, for its VAE, say)."""
        views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one view per tensor, shared weights stay shared
        for module in root.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in list(getattr(module, kind).items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    self.originals.setdefault((id(module), kind, name), (module, tensor))
                    if id(tensor) not in views:
                        view = _view(tensor, inference=False)
                        views[id(tensor)] = tensor, nn.Parameter(view, requires_grad=False) if kind == "_parameters" else view
                    getattr(module, kind)[name] = views[id(tensor)][1]
        with torch.inference_mode():
            for tensor, _ in views.values():
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)

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
        for (_, kind, name), (module, original) in self.originals.items():
            _share(original, getattr(module, kind)[name])  # where the host last put the weights
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


def _view(tensor: torch.Tensor, inference: bool) -> torch.Tensor:
    """A tensor over `tensor`'s memory, an inference tensor or an ordinary one as asked: what a tensor is comes from
    the mode it is made in, not from its memory."""
    with torch.inference_mode(inference):
        view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


def _share(target: torch.Tensor, source: torch.Tensor) -> None:
    """Point the inference tensor `target` (the same object) at `source`'s memory, device and dtype."""
    with torch.inference_mode():
        target.data = _view(source, inference=True)


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
