"""CPU only. The host picks CUDA/MPS and float16 unless --no-half; the stand-in keeps everything float32.

Ports modules/devices.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import gc

import torch

cpu = torch.device("cpu")
device = cpu
device_interrogate = cpu
dtype = torch.float32
dtype_vae = torch.float32
fp8 = False


def torch_gc():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
