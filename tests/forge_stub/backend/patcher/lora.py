"""Forge's LoRA merging (backend/patcher/lora.py): `LoraLoader.refresh` merges a patcher's patches into the
weights under `torch.inference_mode`, replacing each patched Parameter with a new one and keeping the one it replaced
in `backup` (on the offload device); the next refresh with other patches puts the backups back first. One loader
per KModel (`model.lora_loader`), shared by every patcher clone. `merge_lora_to_weight` applies ComfyUI's patch
tuples ("lora", "loha", "lokr"; DoRA's `dora_scale` along the output axis when it has the output's length, else the
input's). Online LoRA, GLoRA, OFT and quantised weights are left out.

Ports backend/patcher/lora.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import torch


def _lora_delta(v, weight):
    up, down, alpha, mid, _ = v
    rank = down.shape[0]
    if mid is not None:
        down = torch.mm(down.transpose(0, 1).flatten(start_dim=1), mid.transpose(0, 1).flatten(start_dim=1))
        down = down.transpose(0, 1)
    delta = torch.mm(up.flatten(start_dim=1).float(), down.flatten(start_dim=1).float())
    return delta.reshape(weight.shape), (alpha / rank if alpha is not None else 1.0)


def _loha_delta(v, weight):
    w1a, w1b, alpha, w2a, w2b, t1, t2, _ = v
    rank = w1b.shape[0]
    if t1 is not None:
        m1 = torch.einsum("i j k l, j r, i p -> p r k l", t1.float(), w1b.float(), w1a.float())
        m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.float(), w2b.float(), w2a.float())
    else:
        m1 = torch.mm(w1a.float(), w1b.float())
        m2 = torch.mm(w2a.float(), w2b.float())
    return (m1 * m2).reshape(weight.shape), (alpha / rank if alpha is not None else 1.0)


def _lokr_delta(v, weight):
    w1, w2, alpha, w1a, w1b, w2a, w2b, t2, _ = v
    rank = None
    if w1 is None:
        rank = w1b.shape[0]
        w1 = torch.mm(w1a.float(), w1b.float())
    if w2 is None:
        rank = w2b.shape[0]
        if t2 is None:
            w2 = torch.mm(w2a.float(), w2b.float())
        else:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.float(), w2b.float(), w2a.float())
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return torch.kron(w1.float(), w2.float()).reshape(weight.shape), scale


_DELTAS = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta}


def _dora(dora_scale, weight, delta):
    merged = weight + delta
    if dora_scale.shape[0] == merged.shape[0]:  # along the output axis
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            merged.shape[0], *[1] * (merged.dim() - 1))
    else:  # along the input axis
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).reshape(
            merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale.float() / norm) - weight


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    dtype = weight.dtype
    weight = weight.to(dtype=computation_dtype, copy=True)
    for strength, (kind, v), strength_model, offset, function in patches:
        if strength_model != 1.0:
            weight *= strength_model
        delta, scale = _DELTAS[kind](v, weight)
        delta = delta * scale
        dora_scale = v[-1]
        if dora_scale is not None:
            delta = _dora(dora_scale, weight, delta)
        weight += strength * delta.to(weight.dtype)
    return weight.to(dtype)


def _get(model, key):
    parent = model
    for name in key.split(".")[:-1]:
        parent = getattr(parent, name)
    return parent, key.split(".")[-1]


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu")):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash:
            return
        devices = {k: p.device for k, p in self.model.named_parameters()}
        for key, weight in self.backup.items():
            parent, name = _get(self.model, key)
            setattr(parent, name, weight if isinstance(weight, torch.nn.Parameter)
                    else torch.nn.Parameter(weight, requires_grad=False))
        self.backup = {}
        merged = {}
        for patches in lora_patches.values():
            for key, current in patches.items():
                merged[key] = merged.get(key, []) + current
        for key, current in merged.items():
            parent, name = _get(self.model, key)
            weight = getattr(parent, name)
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            new = merge_lora_to_weight(current, weight, key, computation_dtype=torch.float32)
            setattr(parent, name, torch.nn.Parameter(new.to(devices[key]), requires_grad=False))
        self.loaded_hash = hashes
