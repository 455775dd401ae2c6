"""Command line: the same engine the WebUI tab runs.

    python -m lohatrain train --demo --output-dir out [--seed N] [--steps N]
    python -m lohatrain train --demo --config run.json      (your settings, on the built-in tiny model)
    python -m lohatrain train --demo --family sdxl --output-dir out   (the tiny SD2 or SDXL model instead)
    python -m lohatrain train --demo --resume out/demo-loha.lohatrain-state   (go on where a run stopped)
    torchrun --nproc-per-node 2 -m lohatrain train --demo --output-dir out   (data-parallel, README)

The demo's sample images are written to `<output dir>/demo-images` (and written again, identically, when a
saved demo run is repeated and they are gone).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .distributed import Ranks, join_torchrun, leave
from .errors import LohatrainError
from .output import STATE_SUFFIX
from .run_state import read_state
from .settings import TrainSettings
from .trainer import Progress, train

DEMO_IMAGES = "demo-images"


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
    """One run; under torchrun, this process's part of a data-parallel run (lohatrain.distributed)."""
    ranks = join_torchrun()
    try:
        return _main(argv, ranks)
    finally:
        leave()


def _main(argv: list[str] | None, ranks: Ranks) -> int:
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
    t.add_argument("--resume", type=Path, metavar="PATH",
                   help="go on with a stopped run: its .lohatrain-state, or the .safetensors it was saved with "
                        "(its settings come from the state; --output-dir and --steps may move or extend it)")
    t.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the dataset or model changed (the result then differs from an "
                        "uninterrupted run, and its metadata says so)")
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

    settings = None
    try:
        resume = read_state(args.resume) if args.resume else None
        if resume:
            settings = resume.record.settings
            args.family = resume.record.family
        elif args.config:
            settings = TrainSettings.load(args.config)
        else:
            if not args.output_dir:
                parser.error("--demo needs --output-dir (or a --config that sets output_dir)")
            settings = demo_settings((args.output_dir / DEMO_IMAGES).resolve(), args.output_dir)
        overrides = {k: v for k, v in (("seed", args.seed), ("steps", args.steps)) if v is not None}
        if args.output_dir:
            overrides["output_dir"] = str(args.output_dir)
        settings = TrainSettings(**{**settings.to_dict(), **overrides})
        settings.validate()
        if ranks.main and not Path(settings.dataset_dir).expanduser().exists():
            # the demo's images are generated: a saved demo run gets them back, identical, where it had them
            make_sample_dataset(Path(settings.dataset_dir).expanduser())
            print(f"wrote the demo's sample images to {settings.dataset_dir}", flush=True)
        ranks.barrier()  # the other processes read them
        result = train(build_model(), settings, model_name=f"lohatrain-tiny-{args.family}-demo",
                       on_progress=_print_progress, resume=resume, resume_anyway=args.resume_anyway, ranks=ranks)
    except LohatrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not ranks.main:
            return 130
        state = Path(settings.output_dir) / f"{settings.name}{STATE_SUFFIX}" if settings else None
        print(f"interrupted; {f'resume with --resume {state}' if state and state.exists() else 'nothing was saved'}",
              file=sys.stderr)
        return 130
    if not ranks.main:
        return 0
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
