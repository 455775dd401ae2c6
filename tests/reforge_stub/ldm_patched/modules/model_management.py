"""reForge's memory manager (ldm_patched/modules/model_management.py at 3b56b26), for the calls lohatrain makes and
the ones reForge makes around a run.

`load_models_gpu(patchers, memory_required)`: every loaded clone of a patcher's model is taken off the list first
(`detach(unpatch_all=False)`: its merged patches stay in the weights until the new one loads); then other models are
unloaded, least recently used first, until the new ones and `max(minimum_inference_memory, memory_required)` fit in
`total_vram`; each is loaded through `partially_load`, whole when it fits beside that room, else in part ("lowvram":
`model_lowvram` set, the rest left in CPU memory). `current_loaded_models` lists what is loaded, most recent first;
an entry equals another holding the same patcher. reForge calls all of this under `torch.inference_mode` during a
generation, so what it moves or patches becomes an inference tensor, as torch does.

Tests run on the CPU, so a move cannot be seen in `tensor.device`: here a move copies every tensor of the model (new
storage made in the caller's grad mode, the Parameter objects kept, as `Module.to` does) and `model.device` says where
it is; `gpu` and `cpu` are both the CPU, told apart by identity. `total_vram` is infinite and
`minimum_inference_memory` 0 unless a test sets them.
"""
import math

import torch

cpu = torch.device("cpu")
gpu = torch.device("cpu")  # the "GPU": equal to the CPU, told apart from `cpu` by identity
total_vram = math.inf
minimum_inference_memory = 0
current_loaded_models = []


def get_torch_device():
    return gpu


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def move(model, device):
    """`model.to(device)`: one transfer (see the module's doc)."""
    if model.device is not device:
        model._apply(lambda t: t.clone())
        model.device = device


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self, lowvram_model_memory=0):
        self.model.partially_load(self.device, math.inf if lowvram_model_memory == 0 else lowvram_model_memory)
        return self.model.model

    def model_unload(self):
        self.model.detach(unpatch_all=True)
        return True

    def __eq__(self, other):
        return self.model is other.model


def _free():
    return total_vram - sum(m.model.loaded_size() for m in current_loaded_models)


def free_memory(memory_required, device, keep_loaded=()):
    for entry in reversed(list(current_loaded_models)):
        if _free() >= memory_required:
            break
        if entry not in keep_loaded:
            entry.model_unload()
            current_loaded_models.remove(entry)


def load_models_gpu(models, memory_required=0, force_full_load=False):
    room = max(minimum_inference_memory, memory_required)
    to_load = []
    for patcher in dict.fromkeys(models):
        entry = LoadedModel(patcher)
        to_load.append(current_loaded_models[current_loaded_models.index(entry)]
                       if entry in current_loaded_models else entry)
    for entry in to_load:
        for other in [m for m in current_loaded_models if entry.model.is_clone(m.model)]:
            current_loaded_models.remove(other)
            other.model.detach(unpatch_all=False)
    needed = sum(e.model.model_size() - e.model.loaded_size() for e in to_load)
    free_memory(needed * 1.3 + room, gpu)
    for entry in to_load:
        missing = entry.model.model_size() - entry.model.loaded_size()
        fits = force_full_load or _free() - room >= missing
        entry.model_load(0 if fits else max(1, _free() - room))
        current_loaded_models.insert(0, entry)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    """`free_memory(1e30, …)`: every model back to its offload device (here whatever `total_vram` says)."""
    for entry in list(current_loaded_models):
        entry.model_unload()
        current_loaded_models.remove(entry)
