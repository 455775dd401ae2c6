"""Data-parallel training with torchrun on the CPU (gloo): two processes train the file one process trains with
the same global batch, only rank 0 writes, and a process that dies stops the run without a partial file."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain.families import ldm_parts
from lohatrain.distributed import Ranks
from lohatrain.errors import LohatrainError
from lohatrain.run_state import read_state
from lohatrain.trainer import train

from runs import EVERY_STREAM, settings_for

REPO = Path(__file__).resolve().parent.parent
# The largest difference of any weight between a two-process and a one-process run of these settings, both in
# float32: the gradients' sums run in another order, and Adam divides each gradient by its own running size,
# so a weight whose gradients are near zero moves by a visibly different amount. Measured: 1.5e-5 (torch 2.13),
# 2.4e-5 (torch 2.1.2). Giving both processes the same image instead (a wrong share) differs by 1.5e-2.
TOLERANCE = 5e-4


@contextmanager
def torchrun(*args: str):
    """`torchrun --standalone --nproc-per-node 2 -m lohatrain …` (a free port, so parallel runs do not meet),
    output and errors in one stream; a test that fails leaves no training process behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "lohatrain", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        yield run
    finally:
        if run.poll() is None:
            for pid in _workers(run.pid).values():
                os.kill(pid, signal.SIGKILL)
            run.kill()
        run.wait()


@pytest.fixture
def seven_images(sample_dataset):
    """The sample images less one: batches of 2 then end each epoch with a single image."""
    first = sorted(sample_dataset.glob("*.png"))[0]
    first.unlink()
    first.with_suffix(".txt").unlink()
    return sample_dataset


def test_two_processes_train_the_file_one_process_trains(tiny_model, seven_images, tmp_path):
    """Global batch 2 (one image per process) with every random stream and the text encoder trained (CLIP
    skip 2: its last layer's adapters get no gradient); each epoch's last batch holds one image, which both
    processes train."""
    settings = settings_for(seven_images, tmp_path / "one", steps=6, keep_state=True, clip_skip=2, **EVERY_STREAM)
    alone = train(ldm_parts(tiny_model), settings)
    config = tmp_path / "run.json"
    config.write_text(settings.to_json())

    with torchrun("train", "--demo", "--config", str(config), "--output-dir", str(tmp_path / "two")) as run:
        output, _ = run.communicate(timeout=300)
    assert run.returncode == 0, output

    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir()) == [
        "test-loha.json", "test-loha.lohatrain-state", "test-loha.lohatrain.json", "test-loha.safetensors"]
    assert output.count("step 1/6 ") == 1 and output.count("wrote ") == 1  # rank 0 alone reports
    ours, theirs = load_file(two / "test-loha.safetensors"), load_file(one / "test-loha.safetensors")
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= TOLERANCE
    # Adam's first moment is the gradient's running mean: equal only if the averaged gradient is the whole batch's
    ours, theirs = (read_state(folder / "test-loha.lohatrain-state") for folder in (two, one))
    moments = [k for k in theirs.tensors if k.endswith(".exp_avg")]
    assert moments and all(torch.allclose(ours.tensors[k], theirs.tensors[k], rtol=0.05, atol=1e-7) for k in moments)
    assert ours.info["losses"] == pytest.approx(alone.losses, rel=1e-5)  # the whole batch's loss, reported
    with safe_open(str(two / "test-loha.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_total_batch_size"], meta["ss_batch_size_per_device"]) == ("2", "1")


def test_a_global_batch_that_does_not_divide_among_the_processes_is_refused(tiny_model, sample_dataset, tmp_path):
    with pytest.raises(LohatrainError, match="batch size \\(3\\) .* must divide evenly .* multiple of 2"):
        train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, batch_size=3), ranks=Ranks(0, 2))
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through Linux's /proc")
def test_a_process_that_dies_stops_the_run_and_leaves_no_partial_file(sample_dataset, tmp_path):
    """Rank 1 is killed (SIGKILL, as the kernel's out-of-memory killer does) once rank 0 reports a step:
    torchrun stops rank 0 and names the process that failed; no final file, no temporary file is left, and
    whatever rank 0 kept opens whole."""
    config = tmp_path / "run.json"
    config.write_text(settings_for(sample_dataset, tmp_path / "out", steps=400).to_json())
    with torchrun("train", "--demo", "--config", str(config)) as run:
        lines = []
        for line in run.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                break
        assert lines and lines[-1].startswith("step 1/"), "".join(lines)
        os.kill(_workers(run.pid)[1], signal.SIGKILL)
        output, _ = run.communicate(timeout=120)
    assert run.returncode != 0
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", output), output
    out = tmp_path / "out"
    assert not (out / "test-loha.safetensors").exists()
    assert not list(out.glob(".*.tmp"))
    for path in [*out.glob("*.safetensors"), *out.glob("*.lohatrain-state")]:
        load_file(path)  # whole


def _workers(torchrun_pid: int) -> dict[int, int]:
    """The processes torchrun started, by rank (their RANK environment variable); none found without /proc."""
    workers = {}
    tasks = Path(f"/proc/{torchrun_pid}/task")
    for task in tasks.iterdir() if tasks.exists() else ():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [int(v[len(b"RANK="):]) for v in environ if v.startswith(b"RANK=")]
            if ranks:
                workers[ranks[0]] = int(pid)
    return workers
