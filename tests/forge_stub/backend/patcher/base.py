"""Forge's `ModelPatcher` (backend/patcher/base.py): a model with its LoRA patches. Clones share the model and its
`lora_loader`; `add_patches` keys ComfyUI patch tuples by the model's parameter names; the memory manager calls
`forge_patch_model` / `forge_unpatch_model` to move the model and `refresh_loras` when it loads it.

Ports backend/patcher/base.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
from backend import memory_management
from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, current_device=None):
        self.model = model
        self.lora_patches = {}
        self.load_device, self.offload_device = load_device, offload_device
        self.current_device = current_device or offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        model_keys = {k for k, _ in self.model.named_parameters()}
        these = {}
        for key, patch in patches.items():
            if key in model_keys:
                these.setdefault(key, []).append([strength_patch, patch, strength_model, None, None])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = these
        return set(these)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)

    def forge_patch_model(self, target_device=None):
        if target_device is not None:
            memory_management.move(self, target_device)
        return self.model

    def forge_unpatch_model(self, target_device=None):
        if target_device is not None:
            memory_management.move(self, target_device)
