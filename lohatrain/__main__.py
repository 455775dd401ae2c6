"""Command line: the same engine the WebUI tab runs.

    python -m lohatrain train --demo --output-dir out [--seed N] [--steps N]
    python -m lohatrain train --demo --config run.json      (your settings, on the built-in tiny model)
    python -m lohatrain train --demo --family sdxl --output-dir out   (the tiny SD2 or SDXL model instead)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .errors import LohatrainError
from .settings import TrainSettings
from .trainer import Progress, train


def _print_progress(p: Progress) -> None:
    if p.stage != "Training":
        print(f"{p.stage}…", flush=True)
    elif p.step == 1 or p.step % 10 == 0 or p.step == p.total:
        print(f"step {p.step}/{p.total}  loss {p.loss:.4f} (smoothed {p.smooth_loss:.4f})  "
              f"lr {p.lr:.2e}  {p.it_per_s:.1f} it/s  ETA {p.eta_s:.0f}s", flush=True)


def demo_settings(dataset_dir: Path, output_dir: Path) -> TrainSettings:
    """A run that finishes in seconds on a CPU: the tiny model, 64 px images, a small network."""
    return TrainSettings(name="demo-loha", dataset_dir=str(dataset_dir), output_dir=str(output_dir),
                         caption_mode="txt", resolution=64, bucket_min_side=64, bucket_max_side=128,
                         steps=60, batch_size=2, learning_rate=3e-3, train_dtype="fp32", save_dtype="fp16",
                         gradient_checkpointing=False, seed=1234, overwrite=True).with_preset("small")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lohatrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoHa")
    t.add_argument("--demo", action="store_true", help="train on the built-in tiny model (no GPU or checkpoint needed)")
    t.add_argument("--config", type=Path, help="settings JSON (as saved beside every trained file)")
    t.add_argument("--output-dir", type=Path, help="where the .safetensors goes (overrides the config)")
    t.add_argument("--seed", type=int)
    t.add_argument("--steps", type=int)
    t.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1", help="which tiny model (default sd1)")
    args = parser.parse_args(argv)

    if not args.demo:
        parser.error("training on a checkpoint file outside the WebUI is not available yet: "
                     "add --demo, or train from the WebUI's LoHa tab")
    from .demo import build_tiny_sd1, build_tiny_sd2, make_sample_dataset

    def build_model():
        if args.family == "sdxl":
            from .demo_sdxl import build_tiny_sdxl
            return build_tiny_sdxl()
        return build_tiny_sd2() if args.family == "sd2" else build_tiny_sd1()

    try:
        with tempfile.TemporaryDirectory(prefix="lohatrain-demo-") as tmp:
            if args.config:
                settings = TrainSettings.load(args.config)
            else:
                if not args.output_dir:
                    parser.error("--demo needs --output-dir (or a --config that sets output_dir)")
                settings = demo_settings(make_sample_dataset(Path(tmp) / "images"), args.output_dir)
            overrides = {k: v for k, v in (("seed", args.seed), ("steps", args.steps)) if v is not None}
            if args.output_dir:
                overrides["output_dir"] = str(args.output_dir)
            settings = TrainSettings.from_dict({**settings.to_dict(), **overrides})
            result = train(build_model(), settings, model_name=f"lohatrain-tiny-{args.family}-demo",
                           on_progress=_print_progress)
    except LohatrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in result.warnings:
        print(f"warning: {w}")
    train_s = result.seconds
    print(f"{result.status}: {result.steps_done} steps in {train_s:.1f}s "
          f"({train_s / max(result.steps_done, 1):.3f} s/step), loss {result.losses[0]:.4f} → "
          f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.4f} (mean of last 10), seed {result.seed}")
    print(f"wrote {result.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
