"""lohatrain's CPU step and time to the first step at the setting issue 22 compares with kohya sd-scripts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/versus_kohya.py [--checkpoint SD15.safetensors] [--steps 6]

The setting: a full-size SD 1.5 with random weights (written to a temporary file by
tools/check_full_size_checkpoints.py's `random_checkpoint` unless --checkpoint names one), the 8 demo images at
256 px, batch 1, LoHa dim 16 / alpha 8, conv 8 / 4, fp32, gradient checkpointing, one thread.

- `cpu_seconds_per_step`: user + system CPU seconds of each step (median of steps 2 onwards), measured in this
  process; CPU seconds rather than wall time because other processes on a shared machine slow the wall clock.
- `first_step_wall_seconds`: `python -m lohatrain train --checkpoint … --steps 1` as a new process, from its start
  to its end (the one step, then a save of under a second).

kohya's figures are the ones recorded in issue 22 on this project's 2-core CPU (sd-scripts v0.10.1 +
lycoris-lora 4.1.3, `--sdpa`, the same setting): its CPU seconds per step were 1.21× those of lohatrain at
commit 25a7762 (UNet only), which this script measured at 43.5 s on the same machine (42.4 and 44.5 in two runs),
so 52.6 s; its time from process start to the end of the first step was 204 s. To compare on another machine,
install kohya in its own venv (`git clone https://github.com/kohya-ss/sd-scripts -b v0.10.1`, `pip install -r
requirements.txt lycoris-lora==4.1.3` in a fresh Python 3.10 venv), run its `train_network.py` with
`--network_module lycoris.kohya --network_args algo=loha conv_dim=8 conv_alpha=4 --network_dim 16
--network_alpha 8 --resolution 256 --train_batch_size 1 --gradient_checkpointing --sdpa --max_train_steps 6`, and
pass its figures with --kohya-step-seconds and --kohya-first-step-seconds.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

with contextlib.redirect_stdout(sys.stderr):
    import lohatrain.ldm_importable  # noqa: E402,F401
import torch  # noqa: E402

from lohatrain import trainer  # noqa: E402
from lohatrain.__main__ import demo_settings  # noqa: E402
from lohatrain.checkpoint import load_model, read_checkpoint  # noqa: E402
from lohatrain.demo import make_sample_dataset  # noqa: E402
from lohatrain.families import ldm_parts  # noqa: E402

KOHYA_STEP_SECONDS = 52.6  # 1.21 × 43.5 (see the docstring)
KOHYA_FIRST_STEP_SECONDS = 204.0
SETTING = dict(training_method="loha", dim=16, alpha=8, conv_dim=8, conv_alpha=4, resolution=256, bucketing=False,
               bucket_min_side=256, bucket_max_side=512, batch_size=1, train_dtype="fp32",
               gradient_checkpointing=True, overwrite=True)
CLI_SETTING = ["--resolution", "256", "--no-bucketing", "--batch-size", "1", "--dim", "16", "--alpha", "8",
               "--conv-dim", "8", "--conv-alpha", "4", "--train-dtype", "fp32", "--overwrite"]


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_seconds(checkpoint: Path, dataset: Path, out: Path, steps: int) -> list[float]:
    model, _ = load_model(read_checkpoint(checkpoint), "fp32", "cpu")
    settings = dataclasses.replace(demo_settings(dataset, out), steps=steps, **SETTING)
    times, last = [], [None]

    def on_progress(p):
        if p.stage == "Training":
            now = cpu_seconds()
            if last[0] is not None:
                times.append(now - last[0])
            last[0] = now

    trainer.train(ldm_parts(model), settings, trainer.Hooks(progress=on_progress))
    return times


def first_step_seconds(checkpoint: Path, dataset: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lohatrain", "train", "--checkpoint", str(checkpoint), "--dataset-dir",
                    str(dataset), "--output-dir", str(out), "--steps", "1", *CLI_SETTING], cwd=REPO_ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="an SD 1.5 checkpoint (default: random weights, written)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kohya-step-seconds", type=float, default=KOHYA_STEP_SECONDS)
    parser.add_argument("--kohya-first-step-seconds", type=float, default=KOHYA_FIRST_STEP_SECONDS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="lohatrain-versus-kohya-") as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            from check_full_size_checkpoints import random_checkpoint
            checkpoint = tmp / "sd15_random.safetensors"
            random_checkpoint("sd1", checkpoint)
        dataset = make_sample_dataset(tmp / "images")
        first = first_step_seconds(checkpoint, dataset, tmp / "cli")
        steps = step_seconds(checkpoint, dataset, tmp / "out", args.steps)
    per_step = statistics.median(steps)
    print(f"load_average_1min: {os.getloadavg()[0]:.2f}")
    print(f"cpu_seconds_per_step: {per_step:.1f} (steps 2-{args.steps}: {', '.join(f'{s:.1f}' for s in steps)})")
    print(f"kohya_cpu_seconds_per_step: {args.kohya_step_seconds:.1f}")
    print(f"step_speed_vs_kohya: {args.kohya_step_seconds / per_step:.2f}x (target: at least 1.5x)")
    print(f"first_step_wall_seconds: {first:.1f}")
    print(f"kohya_first_step_wall_seconds: {args.kohya_first_step_seconds:.1f}")
    print(f"first_step_share_of_kohya: {first / args.kohya_first_step_seconds:.2f} (target: at most 0.3)")


if __name__ == "__main__":
    main()
