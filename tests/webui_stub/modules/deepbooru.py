"""`modules.deepbooru`: the host's DeepDanbooru tagger (`deepbooru.model`), written from v1.10.1's
modules/deepbooru.py. `tag` = start, `tag_multi`, stop; `stop` moves the model to the CPU unless
`interrogate_keep_models_in_memory`; `tag_multi` reads the threshold, sort, spaces, escape, ranks and filter
options from `shared.opts` at each call, drops `rating:` tags, and joins with ", ".

Differences: the model is `deepbooru_model.DeepDanbooruModel`, a tiny deterministic colour tagger built in
code (the host downloads a ResNet's weights); the image is resized to 512×512 directly (the host's
`images.resize_image(2, …)` fills the borders first), which changes nothing for the tiny model's colour means.
Ports modules/deepbooru.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import re

import numpy as np
import torch

from modules import deepbooru_model, devices, shared

re_special = re.compile(r'([\\()])')


class DeepDanbooru:
    def __init__(self):
        self.model = None

    def load(self):
        if self.model is not None:
            return
        self.model = deepbooru_model.DeepDanbooruModel()
        self.model.eval()
        self.model.to(devices.cpu, devices.dtype)

    def start(self):
        self.load()
        self.model.to(devices.device)

    def stop(self):
        if not shared.opts.interrogate_keep_models_in_memory:
            self.model.to(devices.cpu)
            devices.torch_gc()

    def tag(self, pil_image):
        self.start()
        res = self.tag_multi(pil_image)
        self.stop()
        return res

    def tag_multi(self, pil_image, force_disable_ranks=False):
        threshold = shared.opts.interrogate_deepbooru_score_threshold
        use_spaces = shared.opts.deepbooru_use_spaces
        use_escape = shared.opts.deepbooru_escape
        alpha_sort = shared.opts.deepbooru_sort_alpha
        include_ranks = shared.opts.interrogate_return_ranks and not force_disable_ranks

        pic = pil_image.convert("RGB").resize((512, 512))
        a = np.expand_dims(np.array(pic, dtype=np.float32), 0) / 255
        with torch.no_grad():
            x = torch.from_numpy(a).to(devices.device, devices.dtype)
            y = self.model(x)[0].detach().cpu().numpy()

        probability_dict = {}
        for tag, probability in zip(self.model.tags, y):
            if probability < threshold or tag.startswith("rating:"):
                continue
            probability_dict[tag] = probability
        if alpha_sort:
            tags = sorted(probability_dict)
        else:
            tags = [tag for tag, _ in sorted(probability_dict.items(), key=lambda x: -x[1])]

        filtertags = {x.strip().replace(' ', '_') for x in shared.opts.deepbooru_filter_tags.split(",")}
        res = []
        for tag in [x for x in tags if x not in filtertags]:
            probability = probability_dict[tag]
            tag_outformat = tag
            if use_spaces:
                tag_outformat = tag_outformat.replace('_', ' ')
            if use_escape:
                tag_outformat = re.sub(re_special, r'\\\1', tag_outformat)
            if include_ranks:
                tag_outformat = f"({tag_outformat}:{probability:.3f})"
            res.append(tag_outformat)
        return ", ".join(res)


model = DeepDanbooru()
