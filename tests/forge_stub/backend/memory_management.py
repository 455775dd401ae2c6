"""Forge's memory manager (backend/memory_management.py), for the few calls an adapter makes.

`load_models_gpu(patchers, memory_required, hard_memory_preservation)` loads each patcher's model onto its load device (first unloading
clones of it, then other models, most recently used last, until the models and both memory figures fit in
`total_vram`, or nothing else is left to unload) and refreshes its LoRA patches; `current_loaded_models` lists what is loaded, most recent first.
A LoadedModel is equal to another when it holds the same patcher object. Forge calls all of this under
`torch.inference_mode`; a move made outside it turns inference tensors into ordinary ones, as torch's `.to` does.

Tests run on the CPU, so a "device" move cannot be seen in `tensor.device`: here every load and unload copies each
tensor of the model (new storage, made in the caller's grad mode), which is what a transfer between devices does,
and `current_device` on the patcher says where the model is. `total_vram` is infinite unless a test lowers it.
Forge's CPU-swap (a model partly left in CPU memory when VRAM is short) is modelled by `model_accelerated`: a model
loaded while it does not fit is marked so, with its layers' `parameters_manual_cast` set, as Forge does.
Ports backend/memory_management.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
import math

import torch

cpu = torch.device("cpu")
# The "GPU": a torch.device equal to the CPU, told apart from `cpu` by identity (see the module's doc).
gpu = torch.device("cpu")
total_vram = math.inf
current_loaded_models = []


def get_torch_device():
    return gpu


def module_size(module):
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def move(patcher, device):
    """One transfer of the patcher's model (see the module's doc)."""
    if getattr(patcher.model, "stub_location", None) is not device:
        patcher.model._apply(lambda t: t.clone())
        patcher.model.stub_location = device
    patcher.current_device = device


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device
        self.model_accelerated = False

    def size(self):
        return module_size(self.model.model)

    def model_load(self, fits=True):
        self.model.forge_patch_model(self.model.load_device)
        if not fits:
            self.model_accelerated = True
            for m in self.model.model.modules():
                if hasattr(m, "parameters_manual_cast"):
                    m.prev_parameters_manual_cast = m.parameters_manual_cast
                    m.parameters_manual_cast = True
        self.model.refresh_loras()
        return self.model.model

    def model_unload(self, avoid_model_moving=False):
        if self.model_accelerated:
            for m in self.model.model.modules():
                if hasattr(m, "prev_parameters_manual_cast"):
                    m.parameters_manual_cast = m.prev_parameters_manual_cast
                    del m.prev_parameters_manual_cast
            self.model_accelerated = False
        if not avoid_model_moving:
            self.model.forge_unpatch_model(self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def _loaded_size():
    return sum(m.size() for m in current_loaded_models)


def free_memory(memory_required, device, keep_loaded=(), free_all=False):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if not free_all and total_vram - _loaded_size() > memory_required:
            break
        if current_loaded_models[i] not in keep_loaded:
            current_loaded_models.pop(i).model_unload()


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    to_load, already = [], []
    for patcher in models:
        loaded = LoadedModel(patcher)
        if loaded in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(loaded)))
            already.append(loaded)
        else:
            to_load.append(loaded)
    for loaded in to_load:
        for i in range(len(current_loaded_models) - 1, -1, -1):
            if loaded.model.is_clone(current_loaded_models[i].model):
                current_loaded_models.pop(i).model_unload(avoid_model_moving=True)
    free_memory(sum(m.size() for m in to_load) + memory_required + hard_memory_preservation, gpu, keep_loaded=already)
    for loaded in to_load:  # `memory_required` only decides what is unloaded; whether a model fits is its size
        loaded.model_load(fits=total_vram - _loaded_size() >= loaded.size())
        current_loaded_models.insert(0, loaded)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    free_memory(math.inf, gpu, free_all=True)
