"""Check lohatrain.sgm_standin's SDXL UNet against the real one, for a checkout of Stability-AI/generative-models.

    .venv/bin/python tools/check_sgm_standin.py /path/to/generative-models

sgm is not on the package registries, so the tests use the stand-in. This script is how the stand-in was
checked against sgm itself (commit 45c443b3, the WebUI's pin). It builds sgm's `UNetModel` with
sd_xl_base.yaml's settings at full size on the meta device and at the tiny test size on the CPU. It then
checks that the stand-in has the same state-dict keys and shapes and the same module classes, and, with the
same weights, the same output. Only sgm's UNet module is imported; its package `__init__` pulls in open_clip
and kornia, which the dev environment does not have.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import lohatrain.ldm_importable  # noqa: E402,F401  (first: sets up ldm's imports)
import torch  # noqa: E402

from lohatrain.demo_sdxl import FULL_SDXL, TINY_SDXL, build_unet, conditioning_widths  # noqa: E402


def sgm_unet_class(checkout: Path):
    for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
        package = types.ModuleType(name)
        package.__path__ = [str(checkout / name.replace(".", "/"))]
        sys.modules[name] = package
    return importlib.import_module("sgm.modules.diffusionmodules.openaimodel").UNetModel


def build_pair(sgm_unet, sizes: dict):
    context, adm = conditioning_widths(sizes)
    with contextlib.redirect_stdout(io.StringIO()):
        real = sgm_unet(adm_in_channels=adm, num_classes="sequential", use_checkpoint=False, in_channels=4,
                        out_channels=4, model_channels=sizes["model_channels"], attention_resolutions=[4, 2],
                        num_res_blocks=2, channel_mult=list(sizes["channel_mult"]),
                        num_head_channels=sizes["num_head_channels"], use_spatial_transformer=True,
                        use_linear_in_transformer=True, transformer_depth=list(sizes["transformer_depth"]),
                        context_dim=context, spatial_transformer_attn_type="softmax", legacy=False)
    ours = build_unet(sizes, use_checkpoint=False)
    return real, ours


def main(checkout: str) -> int:
    sgm_unet = sgm_unet_class(Path(checkout))
    ok = True
    for label, sizes, device in (("full", FULL_SDXL, "meta"), ("tiny", TINY_SDXL, "cpu")):
        with torch.device(device):
            real, ours = build_pair(sgm_unet, sizes)
        shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (real, ours)]
        classes = [{n: type(m).__name__ for n, m in model.named_modules() if n} for model in (real, ours)]
        print(f"{label}: parameters {sum(p.numel() for p in real.parameters())}, "
              f"same keys and shapes {shapes[0] == shapes[1]}, same module classes {classes[0] == classes[1]}")
        ok &= shapes[0] == shapes[1] and classes[0] == classes[1]
        if device == "cpu":
            torch.manual_seed(0)
            for p in ours.parameters():
                torch.nn.init.normal_(p, std=0.05)
            real.load_state_dict(ours.state_dict())
            args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 700]))
            kwargs = dict(context=torch.randn(2, 77, 80), y=torch.randn(2, 144))
            with torch.no_grad():
                diff = (real(*args, **kwargs) - ours(*args, **kwargs)).abs().max().item()
            print(f"{label}: largest output difference with the same weights {diff:.2e}")
            ok &= diff < 1e-5
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
