"""How long the dataset doctor takes on a large folder: 1,000 JPEG photos' worth of images (768x1024, with
captions), generated into a temporary folder, then `lohatrain.doctor.check` once. Prints the figures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/doctor.py [--images 1000] [--size 768x1024]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lohatrain import doctor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", default="768x1024", help="width x height of each image")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="lohatrain-doctor-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        for i in range(args.images):
            small = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
            Image.fromarray(small).resize((width, height), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
            (folder / f"{i:05d}.txt").write_text(f"mychar, tag{i % 37}, tag{i % 11}")
        made = time.perf_counter() - start
        megabytes = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        start = time.perf_counter()
        report = doctor.check(folder, "txt", resolution=512, batch_size=4)
        seconds = time.perf_counter() - start
    print(f"folder: {args.images} images of {width}x{height} (JPEG, {megabytes:.0f} MB) with captions "
          f"(made in {made:.1f}s)")
    print(f"doctor.check: {seconds:.1f}s ({1000 * seconds / args.images:.1f} ms per image), "
          f"{len(report.problems)} problems, suggested steps {report.suggested_steps}")


if __name__ == "__main__":
    main()
