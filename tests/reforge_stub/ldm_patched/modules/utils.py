"""ldm_patched/modules/utils.py: the attribute setters the patcher replaces weights with.

Ports ldm_patched/modules/utils.py of Panchovix/stable-diffusion-webui-reForge `main` at commit 3b56b268.
"""
import torch


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def set_attr(obj, attr, value):
    *path, last = attr.split(".")
    for name in path:
        obj = getattr(obj, name)
    prev = getattr(obj, last)
    setattr(obj, last, value)
    return prev


def set_attr_param(obj, attr, value):
    return set_attr(obj, attr, torch.nn.Parameter(value, requires_grad=False))
