"""`modules.deepbooru_model`: in the host a ResNet with ~9,000 booru tags; here a tiny deterministic tagger with
the same interface (`tags`, forward on a [1, H, W, 3] float image in 0..1 giving one probability per tag), so
captions depend on the picture: each colour tag's probability is how much of that colour the image holds.

Ports modules/deepbooru_model.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import torch
from torch import nn


class DeepDanbooruModel(nn.Module):
    tags = ["red_(color)", "green_background", "blue_sky", "bright", "dark_(theme)", "solo", "rating:safe"]

    def __init__(self):
        super().__init__()
        # rows: tags; columns: mean red, green, blue and a constant
        weights = torch.tensor([[2.0, -1.0, -1.0, 0.0], [-1.0, 2.0, -1.0, 0.0], [-1.0, -1.0, 2.0, 0.0],
                                [1.0, 1.0, 1.0, -1.5], [-1.0, -1.0, -1.0, 1.5], [0.0, 0.0, 0.0, 0.7],
                                [0.0, 0.0, 0.0, 1.0]])
        self.head = nn.Parameter(weights, requires_grad=False)

    def forward(self, x):
        means = x.mean(dim=(1, 2))
        features = torch.cat([means, torch.ones_like(means[:, :1])], dim=1)
        return (features @ self.head.T).clamp(0, 1)
