"""`modules.interrogate`: the host's CLIP interrogator (`shared.interrogator`), written from v1.10.1's
modules/interrogate.py. `interrogate(pil_image)` wraps itself in `shared.state.begin(job="interrogate")` /
`end()`, loads both models to `devices.device_interrogate`, captions with BLIP, sends BLIP to RAM, ranks the
categories with CLIP (", match" or ", (match:score)" with `interrogate_return_ranks`), then `unload()` sends
both to RAM unless `interrogate_keep_models_in_memory`; any error is reported and gives "<error>" at the end.

Differences: BLIP and CLIP are tiny deterministic colour describers built in code (the host downloads them);
categories are the `*.txt` files of `content_dir` when it exists (the host downloads four when it does not),
each giving its first top-n lines (the host ranks them by CLIP similarity);
no `lowvram.send_everything_to_cpu()` (the stand-in has no low-VRAM mode).
Ports modules/interrogate.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import os
import re
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modules import devices, errors, shared

Category = namedtuple("Category", ["name", "topn", "items"])
re_topn = re.compile(r"\.top(\d+)$")
_COLOURS = ["red", "green", "blue"]


class _TinyDescriber(nn.Module):
    """Mean colour of the image → the name of its strongest channel (BLIP's caption, CLIP's image features)."""

    def forward(self, pixels):
        return torch.as_tensor(pixels, dtype=torch.float32).mean(dim=(0, 1))


class InterrogateModels:
    blip_model = None
    clip_model = None

    def __init__(self, content_dir):
        self.content_dir = content_dir
        self.loaded_categories = None

    def categories(self):
        if self.loaded_categories is not None:
            return self.loaded_categories
        self.loaded_categories = []
        if os.path.exists(self.content_dir):
            for filename in sorted(Path(self.content_dir).glob('*.txt')):
                m = re_topn.search(filename.stem)
                topn = 1 if m is None else int(m.group(1))
                lines = [x.strip() for x in filename.read_text(encoding="utf8").splitlines()]
                self.loaded_categories.append(Category(name=filename.stem, topn=topn, items=lines))
        return self.loaded_categories

    def load(self):
        if self.blip_model is None:
            self.blip_model = _TinyDescriber()
        self.blip_model = self.blip_model.to(devices.device_interrogate)
        if self.clip_model is None:
            self.clip_model = _TinyDescriber()
        self.clip_model = self.clip_model.to(devices.device_interrogate)

    def send_clip_to_ram(self):
        if not shared.opts.interrogate_keep_models_in_memory and self.clip_model is not None:
            self.clip_model = self.clip_model.to(devices.cpu)

    def send_blip_to_ram(self):
        if not shared.opts.interrogate_keep_models_in_memory and self.blip_model is not None:
            self.blip_model = self.blip_model.to(devices.cpu)

    def unload(self):
        self.send_clip_to_ram()
        self.send_blip_to_ram()
        devices.torch_gc()

    def generate_caption(self, pil_image):
        means = self.blip_model(np.asarray(pil_image.convert("RGB"), dtype=np.float32) / 255)
        return f"a picture with a lot of {_COLOURS[int(means.argmax())]}"

    def interrogate(self, pil_image):
        res = ""
        shared.state.begin(job="interrogate")
        try:
            devices.torch_gc()
            self.load()
            res = self.generate_caption(pil_image)
            self.send_blip_to_ram()
            devices.torch_gc()
            for cat in self.categories():
                for match in cat.items[:cat.topn]:
                    res += f", ({match}:1.000)" if shared.opts.interrogate_return_ranks else f", {match}"
        except Exception:
            errors.report("Error interrogating", exc_info=True)
            res += "<error>"
        self.unload()
        shared.state.end()
        return res
