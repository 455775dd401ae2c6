"""Command line: the same engine the WebUI tab runs, on a checkpoint file or on the built-in tiny model.

    python -m lohatrain train --checkpoint MODEL.safetensors --config run.json
    python -m lohatrain train --checkpoint MODEL.ckpt --dataset-dir images --output-dir out --name my-loha
    python -m lohatrain train --checkpoint MODEL.safetensors --resume out/my-loha.lohatrain-state
    python -m lohatrain train --checkpoint MODEL.safetensors --kohya-config kohya_ss.json --output-dir out
    python -m lohatrain train --checkpoint MODEL.safetensors --kohya-config config.toml --kohya-dataset-config ds.toml
    python -m lohatrain train --demo --output-dir out [--seed N] [--steps N]
    python -m lohatrain train --demo --config run.json      (your settings, on the built-in tiny model)
    python -m lohatrain train --demo --family sdxl --output-dir out   (the tiny SD2 or SDXL model instead)
    python -m lohatrain train --checkpoint MODEL.safetensors --config run.json --estimate   (the memory it needs)
    python -m lohatrain train --demo --resume out/demo-loha.lohatrain-state   (go on where a run stopped)
    torchrun --nproc-per-node 2 -m lohatrain train --demo --output-dir out   (data-parallel, README)

Every setting is also an option (`--learning-rate 5e-4`, `--flip-aug`), which overrides the --config file (or the
kohya config); `python -m lohatrain train --help` lists them all with their defaults.

--kohya-config reads a kohya_ss GUI config (.json) or an sd-scripts train_network.py config (.toml) instead of
--config: what has an equivalent is taken, and one message lists every option that was not (lohatrain.kohya_config).

--checkpoint takes an SD 1.x, SD 2.x or SDXL base single-file checkpoint (.safetensors, or .ckpt read
weights-only): its family is told from its keys as the WebUI does, and a `<name>.yaml` beside it is its config.
It is trained on the GPU when there is one (--device), held in the run's train_dtype (fp32 on a CPU unless
given), and the file written is the one the WebUI's tab writes for the same model and settings.

The demo's sample images are written to `<output dir>/demo-images` (and written again, identically, when a
saved demo run is repeated and they are gone).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if "--verbose" in sys.argv[1:]:  # before lohatrain's modules import the libraries (the option parser needs them)
    os.environ["LOHATRAIN_VERBOSE"] = "1"

from . import memory
from .cli_settings import add_setting_options, given_settings, merge
from .distributed import Ranks, join_torchrun, leave
from .errors import LohatrainError
from .kohya_config import import_file
from .output import STATE_SUFFIX
from .preflight import preflight
from .run_state import SavedRun, read_state
from .settings import TrainSettings, read_settings_file
from .families import ldm_parts
from .trainer import Hooks, Progress, train

DEMO_IMAGES = "demo-images"


class _ProgressReport:
    """Stages as lines; the steps as a progress bar on a terminal, else (a log, a pipe) a line every 10 steps."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.bar = stream, None

    def __call__(self, p: Progress) -> None:
        if p.stage != "Training":
            self.close()
            print(f"{p.stage}…", flush=True)
        elif self.stream.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=p.total, initial=p.step - 1, unit="step", file=self.stream, dynamic_ncols=True)
            self.bar.set_postfix_str(f"loss {p.smooth_loss:.4f}, lr {p.lr:.2e}", refresh=False)
            self.bar.update(p.step - self.bar.n)
        elif p.step == 1 or p.step % 10 == 0 or p.step == p.total:
            print(f"step {p.step}/{p.total}  loss {p.loss:.4f} (smoothed {p.smooth_loss:.4f})  "
                  f"lr {p.lr:.2e}  {p.it_per_s:.1f} it/s  ETA {p.eta_s:.0f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def demo_settings(dataset_dir: Path, output_dir: Path) -> TrainSettings:
    """A run that finishes in seconds on a CPU: the tiny model, 64 px images, a small network."""
    return TrainSettings(name="demo-loha", dataset_dir=str(dataset_dir), output_dir=str(output_dir),
                         caption_mode="txt", resolution=64, bucket_min_side=64, bucket_max_side=128,
                         steps=60, batch_size=2, learning_rate=3e-3, train_dtype="fp32", save_dtype="fp16",
                         gradient_checkpointing=False, seed=1234, overwrite=True).with_preset("small")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lohatrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a LoHa (or LoRA, LoCon, LoKr)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    model = t.add_argument_group("model and run")
    model.add_argument("--checkpoint", type=Path, metavar="FILE",
                       help="the model to train on: an SD 1.x, SD 2.x or SDXL base .safetensors or .ckpt")
    model.add_argument("--demo", action="store_true",
                       help="train on the built-in tiny model instead (no GPU or checkpoint needed)")
    model.add_argument("--family", choices=("sd1", "sd2", "sdxl"), default="sd1",
                       help="with --demo: which tiny model (default sd1)")
    model.add_argument("--device", help="where to train: cuda, cuda:1, cpu… (default: cuda when there is a GPU, "
                                        "else cpu; the demo: cpu)")
    model.add_argument("--config", type=Path, metavar="FILE", help="settings JSON (as saved beside every trained file)")
    model.add_argument("--kohya-config", type=Path, metavar="FILE",
                       help="a kohya_ss GUI config (.json) or an sd-scripts train_network.py config (.toml), instead "
                            "of --config: its options with an equivalent are taken, the rest listed")
    model.add_argument("--kohya-dataset-config", type=Path, metavar="FILE",
                       help="with --kohya-config (or alone): sd-scripts' --dataset_config (.toml): its folders, "
                            "repeats and dataset options")
    model.add_argument("--resume", type=Path, metavar="PATH",
                       help="go on with a stopped run: its .lohatrain-state, or any .safetensors it saved (the run "
                            "goes on from its state's step, with its own settings; --output-dir and --steps may "
                            "move or extend it)")
    model.add_argument("--estimate", action="store_true",
                       help="print the memory the run needs on this device (and, when it does not fit the GPU, what "
                            "would) and exit without training")
    model.add_argument("--resume-anyway", action="store_true",
                       help="resume even though the dataset or model changed (the result then differs from an "
                            "uninterrupted run, and its metadata says so)")
    model.add_argument("--verbose", action="store_true",
                       help="also show the libraries' own warnings that lohatrain leaves out as known noise "
                            "(lohatrain.quiet)")
    add_setting_options(t)
    return parser


def main(argv: list[str] | None = None) -> int:
    """One run; under torchrun, this process's part of a data-parallel run (lohatrain.distributed)."""
    ranks = join_torchrun()
    try:
        return _main(argv, ranks)
    finally:
        leave()


def _main(argv: list[str] | None, ranks: Ranks) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.demo == bool(args.checkpoint):
        parser.error("give --checkpoint MODEL.safetensors, or --demo to train on the built-in tiny model")
    kohya = args.kohya_config or args.kohya_dataset_config
    if kohya and args.config:
        parser.error("give --config or --kohya-config, not both")
    if kohya and args.resume:
        parser.error("--resume goes on with the run's own settings: leave out --kohya-config")
    if args.verbose:  # main(argv) called in-process: for the libraries not imported yet (lohatrain.quiet)
        os.environ["LOHATRAIN_VERBOSE"] = "1"
    report = _ProgressReport()
    settings = None
    try:
        resume = read_state(args.resume) if args.resume else None
        if resume and resume.note and ranks.main:
            print(resume.note, flush=True)
        file_settings = _settings_file(args, ranks)
        if args.checkpoint:
            model, settings, model_name, model_hash = _checkpoint_run(args, resume, file_settings)
        else:
            model, settings, model_name, model_hash = _demo_run(args, resume, parser, ranks, file_settings)
        parts = dataclasses.replace(ldm_parts(model), name=model_name, hash=model_hash)
        if args.estimate:
            prepared = preflight(parts, settings, resuming=resume is not None)
            print(memory.estimate(parts, prepared.settings, memory.available_bytes(parts),
                                  prepared=prepared).message(), flush=True)
            return 0
        result = train(parts, settings, Hooks(progress=report), resume=resume, resume_anyway=args.resume_anyway,
                       ranks=ranks)
    except LohatrainError as e:
        report.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        report.close()
        if not ranks.main:
            return 130
        state = Path(settings.output_dir) / f"{settings.name}{STATE_SUFFIX}" if settings else None
        print(f"interrupted; {f'resume with --resume {state}' if state and state.exists() else 'nothing was saved'}",
              file=sys.stderr)
        return 130
    report.close()
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


def _settings_file(args, ranks: Ranks) -> dict | None:
    """The settings of the --config file, or of the kohya config (its message printed once); None without either
    (or when resuming: a resumed run keeps its own)."""
    if args.resume:
        return None
    if args.config:
        return read_settings_file(args.config)
    if not (args.kohya_config or args.kohya_dataset_config):
        return None
    config, dataset = ((args.kohya_config, args.kohya_dataset_config) if args.kohya_config
                       else (args.kohya_dataset_config, None))
    imported = import_file(config, dataset, family=args.family if args.demo else "sd1")
    if ranks.main:
        print(imported.message(), flush=True)
    return imported.settings


def _checkpoint_run(args, resume: SavedRun | None, file_settings: dict | None):
    from .checkpoint import file_sha256, load_model, read_checkpoint
    from .families import BY_NAME

    path = args.checkpoint.expanduser()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def settings_for(family: str) -> TrainSettings:
        if resume:
            return _resumed_settings(resume, given_settings(args))
        base = dict(file_settings or {})
        if torch.device(device).type == "cpu":
            base = {"train_dtype": "fp32", **base}  # as the WebUI's tab on a CPU: fp16 is emulated, twice as slow
        settings = TrainSettings.from_dict(merge(base, given_settings(args)), family)
        if not settings.output_dir:
            raise LohatrainError("give --output-dir (or output_dir in the --config file): where the file goes")
        return settings

    settings_for("sd1")  # the settings' problems before a long read (the family only changes defaults)
    print(f"Reading {path.name}…", flush=True)
    checkpoint = read_checkpoint(path)
    settings = settings_for(checkpoint.family)
    # The file's sha256 (as the WebUI records a checkpoint's hash) is read while the model loads: hashlib and
    # file reads release the GIL, so the two take one's time where a second core is free. An estimate writes no
    # file: no hash to record.
    with ThreadPoolExecutor(1) as pool:
        sha256 = pool.submit(file_sha256, path) if not args.estimate else None
        print(f"Loading the {BY_NAME[checkpoint.family].label} model…", flush=True)
        model, source = load_model(checkpoint, settings.train_dtype, device)
        print(f"loaded {path.name} with {source}, {settings.train_dtype} on {device}", flush=True)
        if sha256 is None:
            return model, settings, path.name, ""
        if not sha256.done():
            print(f"Hashing {path.name} (its sha256, as the WebUI records it)…", flush=True)
        return model, settings, path.name, sha256.result()


def _demo_run(args, resume: SavedRun | None, parser: argparse.ArgumentParser, ranks: Ranks,
              file_settings: dict | None):
    from .demo import build_tiny_sd1, build_tiny_sd2, make_sample_dataset

    given = given_settings(args)
    if resume:
        args.family = resume.record.family
        settings = _resumed_settings(resume, given)
    else:
        if file_settings is not None:
            base = file_settings
        elif "output_dir" in given:
            output_dir = Path(given["output_dir"])
            base = demo_settings((output_dir / DEMO_IMAGES).resolve(), output_dir).to_dict()
        else:
            parser.error("--demo needs --output-dir (or a --config that sets output_dir)")
        settings = TrainSettings.from_dict(merge(base, given), args.family)
    if ranks.main and not Path(settings.dataset_dir).expanduser().exists():
        # the demo's images are generated: a saved demo run gets them back, identical, where it had them
        make_sample_dataset(Path(settings.dataset_dir).expanduser())
        print(f"wrote the demo's sample images to {settings.dataset_dir}", flush=True)
    ranks.barrier()  # the other processes read them
    if args.family == "sdxl":
        from .demo_sdxl import build_tiny_sdxl
        model = build_tiny_sdxl()
    else:
        model = build_tiny_sd2() if args.family == "sd2" else build_tiny_sd1()
    return model.to(args.device or "cpu"), settings, f"lohatrain-tiny-{args.family}-demo", ""


def _resumed_settings(resume: SavedRun, given: dict) -> TrainSettings:
    """The run's own settings; what is given on top the engine accepts only where a resume may differ."""
    settings = dataclasses.replace(resume.record.settings, **given)
    settings.validate()
    return settings


if __name__ == "__main__":
    sys.exit(main())
