"""Leave the host's model exactly as we found it, whatever happens during training.

Training never writes a base weight (the LoHa lives beside the model), so what can change is state around
the weights: `requires_grad` (we freeze), train/eval flags, forwards we route through the LoHa or through
gradient checkpointing, ldm's own checkpoint flags, and devices (the VAE and text encoder leave the GPU).
`ModelGuard` records all of it on entry and puts every bit back on exit, finished, interrupted or failed.
"""
from __future__ import annotations

from torch import nn

# ldm's blocks checkpoint through their own autograd function, which only differentiates the block's own
# parameters: the LoHa weights would silently get no gradient. These flags are turned off while training.
_LDM_CHECKPOINT_FLAGS = ("checkpoint", "use_checkpoint")


class ModelGuard:
    def __init__(self, *roots: nn.Module):
        self.roots = [r for r in roots if r is not None]

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
        for m, training, forward, flags in zip(self.modules, self.training, self.forwards, self.flags):
            m.training = training
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
            m.__dict__.update(flags)
        for m, kind, name, device, dtype, requires_grad in self.tensors:
            tensor = getattr(m, kind)[name]
            if tensor.device != device or tensor.dtype != dtype:
                if kind == "_parameters":
                    tensor.data = tensor.data.to(device, dtype)
                else:
                    m._buffers[name] = tensor.to(device, dtype)
            if kind == "_parameters":
                tensor.requires_grad_(requires_grad)
