"""What a training leaves of the WebUI process's shared state: the umask, the global random generators, the
environment, and the order in which a job's outcome becomes visible to another thread polling it."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from lohatrain.families import ldm_parts
from lohatrain.jobs import Job, JobRunner
from lohatrain.network import LayerPlan, Network
from lohatrain.output import write_atomically
from lohatrain.preflight import Prepared
from lohatrain.trainer import TrainResult, _determinism, train

from runs import settings_for


def test_files_are_written_without_touching_the_process_umask(tmp_path, monkeypatch):
    """Another thread creating a file meanwhile must not get it world-writable (umask 0)."""
    def umask_called(mask):
        raise AssertionError(f"os.umask({mask:o}) changes the mask of every thread of the WebUI")

    monkeypatch.setattr(os, "umask", umask_called)
    write_atomically(tmp_path / "a.safetensors", b"data", overwrite=False)
    monkeypatch.undo()
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_training_leaves_the_global_generators_where_they_were(tiny_model, sample_dataset, tmp_path):
    """The LoHa's initial values and the VAE's posterior sample are seeded draws from the global RNG."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "out", steps=1))
    assert torch.equal(torch.rand(4), expected)


def test_building_the_network_keeps_the_callers_random_stream():
    layer = torch.nn.Linear(4, 4)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Network([LayerPlan("lora_unet_x", layer, 2, 2.0)], seed=99)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("before", [None, ":16:8"])
def test_deterministic_mode_puts_the_environment_back(monkeypatch, before):
    if before is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", before)
    with _determinism(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == (before or ":4096:8")
        assert torch.are_deterministic_algorithms_enabled()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == before
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("ending", ["done", "error"])
def test_a_job_never_shows_its_final_state_without_its_message(tmp_path, monkeypatch, ending):
    """Every field assignment of the job is observed from the poller's side: the state a tab or REST client
    reads is final only once the message (and the file) are there."""
    seen = []
    original_setattr = Job.__setattr__

    def observe(job, name, value):
        original_setattr(job, name, value)
        if "lock" in job.__dict__:
            seen.append(JobRunner._snapshot(job))

    monkeypatch.setattr(Job, "__setattr__", observe)
    finished = threading.Event()

    def run(job):
        try:
            if ending == "error":
                raise RuntimeError("boom")
            return TrainResult("done", tmp_path / "x.safetensors", 3, 7, 1.0)
        finally:
            finished.set()

    runner = JobRunner(run)
    runner.start(Prepared(settings_for(tmp_path, tmp_path), None, []))
    assert finished.wait(60)
    runner._thread.join(60)
    final = [s for s in seen if s["state"] != "running"]
    assert final and all(s["message"] for s in final)
    if ending == "done":
        assert all(s["file"] == str(tmp_path / "x.safetensors") for s in final)
    assert runner.status()["state"] == ending


def test_the_restore_carries_on_past_a_failing_part_and_names_it():
    """Say putting one part back fails (out of memory moving it to the GPU): every other part is still put
    back, and the message names the part that is not as it was."""
    from torch import nn

    from lohatrain.errors import LohatrainError
    from lohatrain.model_guard import ModelGuard

    class Stubborn(nn.Linear):
        refuse = False

        def __setattr__(self, name, value):
            if name == "training" and Stubborn.refuse:
                raise RuntimeError("CUDA out of memory")
            super().__setattr__(name, value)

    model = nn.Sequential(Stubborn(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(LohatrainError, match=r"1 part\(s\).*the train/eval mode of 0 \(RuntimeError: CUDA out"):
        with ModelGuard(model):
            model.eval()
            Stubborn.refuse = True
            model[1].double()
            model[2].weight.requires_grad_(False)
    Stubborn.refuse = False
    assert model[1].weight.dtype == torch.float32 and model[1].training  # after the failing part
    assert model[2].weight.requires_grad and model[2].training
    assert not model[0].training  # the one part that could not be put back, as the message says
