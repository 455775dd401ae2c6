"""A check too slow and too big for the test suite: full-size SD 1.x, SD 2.x and SDXL base checkpoints, written
with random weights in the original single-file layout and with no config beside them, load through
`python -m lohatrain train --checkpoint` with the built-in configs and train a step at 64 px on the CPU.

    .venv/bin/python tools/check_full_size_checkpoints.py [sd1] [sd2] [sdxl]

Each file is written in fp16 to a temporary folder (about 2.1, 2.6 and 6.9 GB) and removed afterwards; SDXL
trains in bf16 (its fp32 copy would need 14 GB). Random weights: normal(0, 0.02), norms 1, biases 0, so the
SD 2.x v-prediction test gives an arbitrary answer here: it shows that it runs, not what it finds.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lohatrain import model_configs  # noqa: E402
from lohatrain.__main__ import main  # noqa: E402
from lohatrain.checkpoint import _parameters_on_meta  # noqa: E402
from lohatrain.demo import make_sample_dataset  # noqa: E402

# The text encoders' sizes, given as the weights they are read from: CLIP ViT-L, OpenCLIP ViT-H and bigG.
_CLIP_L = {"embeddings.token_embedding.weight": (49408, 768), "encoder.layers.0.mlp.fc1.weight": (3072, 768),
           "embeddings.position_embedding.weight": (77, 768), **{f"encoder.layers.{i}.": (1,) for i in range(12)}}


def _openclip(width: int, layers: int) -> dict:
    return {"token_embedding.weight": (49408, width), "positional_embedding": (77, width),
            **{f"transformer.resblocks.{i}.": (1,) for i in range(layers)}}


TEXT_SHAPES = {
    "sd1": {f"cond_stage_model.transformer.text_model.{k}": v for k, v in _CLIP_L.items()},
    "sd2": {f"cond_stage_model.model.{k}": v for k, v in _openclip(1024, 24).items()},
    "sdxl": {**{f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in _CLIP_L.items()},
             **{f"conditioner.embedders.1.model.{k}": v for k, v in _openclip(1280, 32).items()}},
}


def random_checkpoint(family: str, path: Path) -> int:
    """The built-in config's model as a single-file checkpoint with random fp16 weights; its parameter count."""
    shapes = {k: torch.empty(shape, device="meta") for k, shape in TEXT_SHAPES[family].items()}
    with _parameters_on_meta():
        model = model_configs.build(model_configs.BUILT_IN[family], shapes)
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key not in parameters:
            tensors[key] = tensor.contiguous()  # buffers: the noise schedule, position ids
        elif key.endswith("bias"):
            tensors[key] = torch.zeros(tensor.shape, dtype=torch.float16)
        elif "norm" in key or ".ln_" in key or "ln_final" in key:
            tensors[key] = torch.ones(tensor.shape, dtype=torch.float16)
        else:
            tensors[key] = (torch.randn(tensor.shape, generator=generator) * 0.02).half()
    save_file(tensors, str(path))
    return sum(p.numel() for p in parameters.values())


def check(family: str, folder: Path, dataset: Path) -> None:
    path = folder / f"random-{family}.safetensors"
    started = time.perf_counter()
    count = random_checkpoint(family, path)
    print(f"\n{family}: wrote {path.name}, {count:,} parameters, {path.stat().st_size / 2**30:.1f} GiB, "
          f"in {time.perf_counter() - started:.0f}s", flush=True)
    started = time.perf_counter()
    code = main(["train", "--checkpoint", str(path), "--dataset-dir", str(dataset), "--output-dir",
                 str(folder / "out"), "--name", family, "--resolution", "64", "--bucket-min-side", "64",
                 "--bucket-max-side", "128", "--batch-size", "1", "--steps", "1", "--network-preset", "small",
                 "--seed", "1", "--train-dtype", "bf16" if family == "sdxl" else "fp32", "--device", "cpu"])
    print(f"{family}: exit code {code} after {time.perf_counter() - started:.0f}s", flush=True)
    path.unlink()
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_sample_dataset(Path(tmp) / "dataset")
        for family in sys.argv[1:] or ["sd1", "sd2", "sdxl"]:
            check(family, Path(tmp), dataset)
