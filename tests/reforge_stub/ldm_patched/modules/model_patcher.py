"""ldm_patched's ModelPatcher (ldm_patched/modules/model_patcher.py at 3b56b26; reForge's UnetPatcher adds nothing
used here), for what LoRAs and the memory manager do with it.

A patcher holds a model (`BaseModel`, whose `diffusion_model` is the UNet) and LoRA patches by state-dict key; clones
share the model, the patches' uuid and one `backup` dict. Loading a patcher (`partially_load`, from the memory
manager) first unpatches a clone's merged weights when the model carries another uuid's patches (restoring `backup`),
then, to load whole, merges each patch: the weight's backup is kept (`weight.to(offload_device)`: the very tensor when
that device is the load device, as on a large GPU) and the Parameter is REPLACED by a new one
(`set_attr_param`); then the model moves to the device. Loaded in part ("lowvram"), the weights stay where they are
and are patched as they are cast (not modelled: a run refuses that state). `detach` unpatches and moves the model to
its offload device. What the model carries: `device`, `model_lowvram`, `model_loaded_weight_memory`,
`current_weight_patches_uuid`.
"""
import uuid

import torch

from . import model_management
from .lora import calculate_weight
from .utils import get_attr, set_attr_param


class ModelPatcher:
    def __init__(self, model, load_device, offload_device):
        self.model = model
        self.load_device, self.offload_device = load_device, offload_device
        self.patches = {}
        self.backup = {}
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        if getattr(model, "device", None) is None:
            model.device = offload_device
        for name, value in (("model_loaded_weight_memory", 0), ("model_lowvram", False),
                            ("current_weight_patches_uuid", None)):
            if not hasattr(model, name):
                setattr(model, name, value)

    def model_size(self):
        return model_management.module_size(self.model)

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.backup = self.backup
        n.parent = self
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        keys = set(self.model.state_dict())
        added = []
        for k, patch in patches.items():
            if k in keys:
                self.patches.setdefault(k, []).append((strength_patch, patch, strength_model, None, None))
                added.append(k)
        self.patches_uuid = uuid.uuid4()
        return added

    def patch_weight_to_device(self, key, device_to=None):
        if key not in self.patches:
            return
        weight = get_attr(self.model, key)
        if key not in self.backup:
            self.backup[key] = weight.to(device=self.offload_device)
        merged = calculate_weight(self.patches[key], weight.to(torch.float32, copy=True), key)
        set_attr_param(self.model, key, merged.to(weight.dtype))

    def load(self, device_to, lowvram_model_memory=0, full_load=False):
        if full_load:
            for key in self.patches:
                self.patch_weight_to_device(key, device_to)
            model_management.move(self.model, device_to)
            self.model.model_lowvram = False
            self.model.model_loaded_weight_memory = self.model_size()
        else:
            self.model.model_lowvram = True
            self.model.model_loaded_weight_memory = min(lowvram_model_memory, self.model_size() - 1)
        self.model.device = device_to
        self.model.current_weight_patches_uuid = self.patches_uuid

    def partially_load(self, device_to, extra_memory=0):
        current = self.model.current_weight_patches_uuid
        if current is not None and current != self.patches_uuid:
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        if not self.model.model_lowvram and self.model.model_loaded_weight_memory > 0:
            return 0
        self.load(device_to, extra_memory, full_load=self.model.model_loaded_weight_memory + extra_memory
                  >= self.model_size())
        return self.model.model_loaded_weight_memory

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if not unpatch_weights:
            return
        self.model.model_lowvram = False
        for key, weight in self.backup.items():
            set_attr_param(self.model, key, weight)
        self.backup.clear()
        self.model.current_weight_patches_uuid = None
        if device_to is not None:
            model_management.move(self.model, device_to)
        self.model.model_loaded_weight_memory = 0

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        return self.model
