"""Resume: a run stopped at any step (interrupt, error, killed process) and resumed ends in the same bytes as one
that never stopped; what cannot be resumed exactly is refused with what changed; `init_from` starts a new run
from a file of the same type and size."""
from __future__ import annotations

import dataclasses

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain.compat import autocast_supports
from lohatrain.errors import LohatrainError
from lohatrain.run_state import list_resumable, read_state
from lohatrain.families import ldm_parts
from lohatrain.trainer import train

from runs import EVERY_STREAM, family_model, lora_files, resume_run, settings_for, stopping_at

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fixed_clock")


def test_stopped_at_any_step_and_resumed_the_files_are_the_uninterrupted_runs(tiny_model, sample_dataset, tmp_path):
    """Every random stream the loop draws from (batch order, noise, flips, colour, tag order, VAE posterior),
    text-encoder training, a warm-up and cosine schedule and intermediate saves: after the first step, between
    two saves (the middle), and one before the last (at a save)."""
    kw = dict(steps=5, save_every_steps=2, **EVERY_STREAM)
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "whole", **kw))
    assert not (tmp_path / "whole" / "test-loha.lohatrain-state").exists()  # a finished run leaves no state
    for stop in (1, 3, 4):
        out = tmp_path / f"stopped-{stop}"
        first = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, out, **kw), stopping_at(stop))
        assert first.status == "interrupted" and first.steps_done == stop
        assert [r["name"] for r in list_resumable(out)] == ["test-loha"]
        assert list_resumable(out)[0]["step"] == stop and list_resumable(out)[0]["total"] == 5
        result = resume_run(copy.deepcopy(tiny_model), out)
        assert result.status == "done" and result.steps_done == 5
        assert lora_files(out) == lora_files(tmp_path / "whole"), stop
        assert not (out / "test-loha.lohatrain-state").exists()


def test_an_error_keeps_the_last_whole_step_and_resumes_from_it(tiny_model, sample_dataset, tmp_path):
    """An error in the middle of step 4 (here the text encoder fails) saves the state of step 3, not a step
    whose random draws were half made."""
    kw = dict(steps=5, **EVERY_STREAM)
    reference = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "whole", **kw))
    model = copy.deepcopy(tiny_model)
    calls = []
    real_encode = model.get_learned_conditioning

    def failing_encoder(prompts):
        calls.append(1)
        if len(calls) == 4:  # the 4th step's captions: after that step's batch, flips and colours were drawn
            raise RuntimeError("the text encoder failed")
        return real_encode(prompts)

    with pytest.raises(RuntimeError, match="text encoder failed"):
        train(dataclasses.replace(ldm_parts(model), prompt_encoder=lambda _skip: failing_encoder), settings_for(sample_dataset, tmp_path / "failed", **kw))
    assert read_state(tmp_path / "failed" / "test-loha.lohatrain-state").step == 3
    result = resume_run(copy.deepcopy(tiny_model), tmp_path / "failed")
    assert result.file.read_bytes() == reference.file.read_bytes()


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_resume_is_exact_on_sd2_and_sdxl(sample_dataset, tmp_path, family):
    template = family_model(family)
    kw = dict(steps=4, text_encoder_lr=1e-3, flip_aug=True, conv_dim=2, conv_alpha=1)
    reference = train(ldm_parts(copy.deepcopy(template)), settings_for(sample_dataset, tmp_path / "whole", **kw))
    train(ldm_parts(copy.deepcopy(template)), settings_for(sample_dataset, tmp_path / "stopped", **kw), stopping_at(2))
    result = resume_run(copy.deepcopy(template), tmp_path / "stopped")
    assert result.file.read_bytes() == reference.file.read_bytes()


@pytest.mark.skipif(not autocast_supports("cpu", torch.float16), reason="CPU fp16 autocast needs torch 2.3")
def test_resume_is_exact_in_fp16_with_its_loss_scaler(tiny_model, sample_dataset, tmp_path):
    kw = dict(steps=3, train_dtype="fp16", save_dtype="fp16")
    reference = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "whole", **kw))
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "stopped", **kw), stopping_at(1))
    saved = read_state(tmp_path / "stopped" / "test-loha.lohatrain-state")
    assert saved.info["scaler"]["scale"] > 0  # the scaler's state travels with the run
    assert resume_run(copy.deepcopy(tiny_model), tmp_path / "stopped").file.read_bytes() == reference.file.read_bytes()


def test_any_file_a_run_saved_resumes_from_its_state_another_runs_or_an_older_state_is_refused(
        tiny_model, sample_dataset, tmp_path, monkeypatch):
    kw = dict(steps=6, save_every_steps=2)
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "run", **kw), stopping_at(4))
    assert read_state(tmp_path / "run" / "test-loha-4.safetensors").step == 4
    older = read_state(tmp_path / "run" / "test-loha-2.safetensors")
    assert older.step == 4
    assert older.note == ("test-loha-2.safetensors is from step 2; the run continues from its state "
                          "test-loha.lohatrain-state at step 4")

    # The same run's state from step 2 copied over the newer one: it does not hold the step-4 file's weights.
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "early", **kw), stopping_at(2))
    shutil.copy(tmp_path / "early" / "test-loha.lohatrain-state", tmp_path / "run")
    with pytest.raises(LohatrainError, match=r"test-loha-4.safetensors was saved at step 4, but its run's state "
                                             r"\(test-loha.lohatrain-state\) is older, at step 2"):
        read_state(tmp_path / "run" / "test-loha-4.safetensors")
    assert read_state(tmp_path / "run" / "test-loha-2.safetensors").step == 2

    # Another run of the name (started later, or with another seed) replaced the state: the old files are refused.
    for folder, seed, started_at in (("later", 7, "1700000600"), ("reseeded", 8, "1700000000")):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", started_at)
        train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / folder, seed=seed, **kw), stopping_at(4))
        shutil.copy(tmp_path / folder / "test-loha.lohatrain-state", tmp_path / "run")
        with pytest.raises(LohatrainError, match=f"test-loha-2.safetensors is from another run than "
                                                 f"test-loha.lohatrain-state .*with seed {seed}"):
            read_state(tmp_path / "run" / "test-loha-2.safetensors")


def test_a_changed_dataset_is_refused_with_the_files_named_unless_resumed_anyway(tiny_model, sample_dataset,
                                                                              tmp_path):
    out = tmp_path / "out"
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, out, steps=4), stopping_at(2))
    caption = next(sample_dataset.glob("*.txt"))
    caption.write_text("something else entirely")
    shutil.copy(next(sample_dataset.glob("*.png")), sample_dataset / "zz-new.png")
    (sample_dataset / "zz-new.txt").write_text("new image")
    before = lora_files(out), (out / "test-loha.lohatrain-state").read_bytes()
    with pytest.raises(LohatrainError) as refused:
        resume_run(copy.deepcopy(tiny_model), out)
    message = str(refused.value)
    assert "images added: zz-new.png" in message
    assert f"images with another caption: {caption.with_suffix('.png').name}" in message
    assert (lora_files(out), (out / "test-loha.lohatrain-state").read_bytes()) == before  # nothing written

    saved = read_state(out / "test-loha.lohatrain-state")
    result = train(ldm_parts(copy.deepcopy(tiny_model)), saved.record.settings, resume=saved, resume_anyway=True)
    assert result.status == "done" and result.steps_done == 4
    with safe_open(result.file, "pt") as f:
        assert "zz-new.png" in f.metadata()["lohatrain_resumed_with_changes"]


def test_another_model_is_refused(tiny_model, sample_dataset, tmp_path):
    from lohatrain.demo import build_tiny_sd1

    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, steps=4), stopping_at(2))
    with pytest.raises(LohatrainError, match="another checkpoint is loaded"):
        resume_run(build_tiny_sd1(1), tmp_path)


def test_a_resume_keeps_the_runs_settings_but_may_extend_it(tiny_model, sample_dataset, tmp_path):
    import dataclasses

    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, steps=4), stopping_at(2))
    saved = read_state(tmp_path / "test-loha.lohatrain-state")
    with pytest.raises(LohatrainError, match="learning_rate"):
        train(ldm_parts(copy.deepcopy(tiny_model)), dataclasses.replace(saved.record.settings, learning_rate=0.1), resume=saved)
    longer = train(ldm_parts(copy.deepcopy(tiny_model)), dataclasses.replace(saved.record.settings, steps=7), resume=saved)
    assert longer.steps_done == 7 and len(longer.losses) == 7


def test_a_damaged_state_is_refused(tiny_model, sample_dataset, tmp_path):
    train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, steps=4), stopping_at(2))
    state = tmp_path / "test-loha.lohatrain-state"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(LohatrainError, match="damaged"):
        read_state(state)
    assert list_resumable(tmp_path) == []


def test_init_from_starts_from_the_file_and_refuses_another_type_size_or_family(tiny_model, sample_dataset,
                                                                                 tmp_path):
    first = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, name="yesterday", steps=3))
    more = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, name="today", steps=1,
                                                        init_from="yesterday.safetensors", learning_rate=1e-9))
    old, new = load_file(first.file), load_file(more.file)
    assert old.keys() == new.keys()
    for key in old:
        torch.testing.assert_close(new[key], old[key], atol=1e-6, rtol=0)

    cases = [({"training_method": "lora", "conv_dim": 0}, "it is a LoHa file, these settings train LoRA/LoCon"),
             ({"dim": 16, "alpha": 8}, "its sizes differ"),
             ({"dora": True}, "without DoRA")]
    for overrides, message in cases:
        with pytest.raises(LohatrainError, match=message):
            train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path, name="x", steps=1,
                                                          init_from="yesterday.safetensors", **overrides))
    with pytest.raises(LohatrainError, match="another model family"):
        train(ldm_parts(family_model("sdxl")), settings_for(sample_dataset, tmp_path, name="x", steps=1,
                                                  init_from="yesterday.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


DEMO_RUN = ["train", "--demo", "--steps", "8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, bytes]:
    """The demo's settings with a save every 2 steps (images in one shared folder), and the final file of an
    uninterrupted run of them."""
    from lohatrain.__main__ import demo_settings, main

    folder = tmp_path_factory.mktemp("demo")
    config = folder / "demo.json"
    config.write_text(json.dumps({**demo_settings(folder / "images", folder).to_dict(), "save_every_steps": 2}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        assert main([*DEMO_RUN, "--output-dir", str(folder / "whole"), "--config", str(config)]) == 0
    return config, (folder / "whole" / "demo-loha.safetensors").read_bytes()


def run_command_line(*args, wrapper: tuple = (), background: bool = False, **kwargs):
    """`python -m lohatrain train --demo --steps 8 ARGS` in another process; or, with wrapper=(SCRIPT,
    *SCRIPT_ARGS), `python -c SCRIPT SCRIPT_ARGS train --demo --steps 8 ARGS`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SOURCE_DATE_EPOCH": "1700000000"}
    command = [sys.executable, "-c", *map(str, wrapper)] if wrapper else [sys.executable, "-m", "lohatrain"]
    run = subprocess.Popen if background else partial(subprocess.run, timeout=300)
    return run([*command, *DEMO_RUN, *map(str, args)], cwd=REPO, env=env, **kwargs)


def test_a_killed_command_line_leaves_only_whole_files_and_resumes_to_the_same_file(demo_run, tmp_path):
    """SIGKILL while a file is being written (every write made slow); then --resume finishes the run."""
    config, whole = demo_run
    out = tmp_path / "killed"
    slow_writes = ("import os, sys, time; fsync = os.fsync; "
                   "os.fsync = lambda fd: (time.sleep(0.5), fsync(fd))[1]; "
                   "from lohatrain.__main__ import main; sys.exit(main(sys.argv[1:]))")
    proc = run_command_line("--output-dir", out, "--config", config, wrapper=(slow_writes,), background=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(out.glob(".demo-loha-4.safetensors.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)  # until the save at step 4 is in the middle of writing its file
        assert any(out.glob(".demo-loha-4.safetensors.*.tmp")), "the run never reached its second save"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for path in out.glob("*.safetensors"):
        load_file(path)  # whole: every .safetensors there opens
    assert not (out / "demo-loha-4.safetensors").exists()
    resumed = run_command_line("--resume", out / "demo-loha-2.safetensors", capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "demo-loha.safetensors").read_bytes() == whole
    assert not list(out.glob(".*.tmp"))  # what the killed writer left was cleared


# The command line (sys.argv[3:]), killed right after the Nth whole write (N: sys.argv[2]) of the file named
# sys.argv[1], as a power cut or a killed WebUI would stop it between two writes.
KILL_AFTER_WRITE = """
import os, signal, sys
from pathlib import Path
from lohatrain import output, run_state
name, nth, write, written = sys.argv[1], int(sys.argv[2]), output.write_atomically, []

def write_then_die(path, content, overwrite):
    write(path, content, overwrite)
    written.append(Path(path).name)
    if written.count(name) == nth:
        os.kill(os.getpid(), signal.SIGKILL)

output.write_atomically = run_state.write_atomically = write_then_die
from lohatrain.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("killed_after, nth, newest", [
    ("demo-loha.lohatrain-state", 2, "demo-loha-2.safetensors"),  # the state of step 4, before its file
    ("demo-loha-4.safetensors", 1, "demo-loha-4.safetensors"),  # the file of step 4
], ids=["after-the-state", "after-the-file"])
def test_a_killed_command_line_resumes_from_the_newest_file_on_disk(demo_run, tmp_path, killed_after, nth,
                                                                    newest):
    """Killed between the two writes of the save at step 4, or right after both: the newest .safetensors there
    resumes (the run's state is already at step 4) and the run ends in the uninterrupted run's file."""
    config, whole = demo_run
    out = tmp_path / "killed"
    killed = run_command_line("--output-dir", out, "--config", config, wrapper=(KILL_AFTER_WRITE, killed_after, nth),
                              capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    on_disk = max(out.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    assert on_disk.name == newest
    resumed = run_command_line("--resume", on_disk, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "the run continues from its state demo-loha.lohatrain-state at step 4" in resumed.stdout
    assert (out / "demo-loha.safetensors").read_bytes() == whole
    assert not (out / "demo-loha.lohatrain-state").exists()


def test_a_saved_demo_run_repeats_from_its_settings_file_even_without_its_images(tmp_path, capsys):
    """docs/command-line.md's "a saved run, again": the demo's images are generated, so they come back identical."""
    from lohatrain.__main__ import main

    assert main(["train", "--demo", "--output-dir", str(tmp_path / "first"), "--steps", "3"]) == 0
    shutil.rmtree(tmp_path / "first" / "demo-images")
    config = tmp_path / "first" / "demo-loha.lohatrain.json"
    assert main(["train", "--demo", "--config", str(config), "--output-dir", str(tmp_path / "again")]) == 0
    assert "wrote the demo's sample images" in capsys.readouterr().out
    assert ((tmp_path / "again" / "demo-loha.safetensors").read_bytes()
            == (tmp_path / "first" / "demo-loha.safetensors").read_bytes())
