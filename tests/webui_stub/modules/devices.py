"""CPU only. The host picks CUDA/MPS and float16 unless --no-half; the stand-in keeps everything float32."""
import gc

import torch

cpu = torch.device("cpu")
device = cpu
device_interrogate = device_gfpgan = device_esrgan = device_codeformer = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False


def get_optimal_device_name():
    return "cpu"


def get_optimal_device():
    return cpu


def torch_gc():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
