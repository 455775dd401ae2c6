"""The memory estimate (lohatrain.memory) against what a real run holds, on the tiny SD1 and SDXL models: the same
parts, the same step, the same tracker; a run that does not fit is refused naming what would; nothing of the model
is loaded, copied or moved to decide."""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
from collections import defaultdict

import pytest
import torch

from lohatrain import __main__ as cli
from lohatrain import compat, loop, memory, optimizers, trainer
from lohatrain.errors import LohatrainError
from lohatrain.demo_sdxl import build_tiny_sdxl
from lohatrain.families import ldm_parts
from lohatrain.preflight import preflight
from lohatrain.settings import TrainSettings
from lohatrain.trainer import train

from test_engine import model_state
from test_precision import hold_like_the_webui


def settings_for(dataset, out, family: str = "sd1", **overrides) -> TrainSettings:
    return TrainSettings.from_dict({
        "name": "estimated", "dataset_dir": str(dataset), "output_dir": str(out), "resolution": 64,
        "bucket_min_side": 64, "bucket_max_side": 128, "steps": 2, "batch_size": 2, "train_dtype": "fp32",
        "gradient_checkpointing": False, "seed": 5, "network_preset": "small", "overwrite": True, **overrides}, family)


def measured(parts, settings: TrainSettings, live_tensor_bytes, monkeypatch) -> tuple[int, int]:
    """A real two-step run, measured at its second step: every tensor alive in the process when the step starts
    (a gc walk: the model, the cache, the network and the optimizer's state), and the peak the step adds on top
    (the estimate's own tracker, on the real step). Returns (peak bytes, the step's own bytes)."""
    tracker, seen, real_step = memory.Tracker(), {}, loop.step

    def tracked_step(setup, state):
        if state.step == 1:
            gc.collect()
            seen["alive"] = live_tensor_bytes()
            tracker.reset_peak()
            start = tracker.live["cpu"]
        with tracker:
            real_step(setup, state)
        if state.step == 2:
            seen["step"] = tracker.peak["cpu"] - start

    monkeypatch.setattr(loop, "step", tracked_step)
    gc.collect()
    before = live_tensor_bytes()
    model = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage().data_ptr(): t for t in [
        *parts.root.parameters(), *parts.root.buffers()]}.values())
    train(parts, settings)
    return model + seen["alive"] - before + seen["step"], seen["step"]


CASES = [
    ("sd1", {"training_method": "lora", "text_encoder_lr": 1e-4}),
    ("sd1", {"training_method": "locon", "dora": True, "gradient_checkpointing": True}),
    ("sd1", {"training_method": "loha", "train_dtype": "bf16"}),
    ("sd1", {"training_method": "lokr", "gradient_checkpointing": True, "shuffle_tags": True, "flip_aug": True}),
    ("sdxl", {"training_method": "loha", "gradient_checkpointing": True}),
    ("sdxl", {"training_method": "lora", "text_encoder_lr": 1e-4}),
]


@pytest.mark.parametrize("family, overrides", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES])
def test_the_estimate_is_what_a_real_step_holds(tiny_model, sample_dataset, tmp_path, live_tensor_bytes,
                                                 monkeypatch, family, overrides):
    model = tiny_model if family == "sd1" else build_tiny_sdxl(0)
    parts = ldm_parts(model)
    settings = settings_for(sample_dataset, tmp_path, family, **overrides)
    est = memory.estimate(parts, settings, prepared=preflight(parts, settings))
    peak, step = measured(parts, settings, live_tensor_bytes, monkeypatch)
    assert est.phase == "training" and est.device == "cpu" and est.fits is None
    assert sum(est.parts.values()) == est.need
    assert est.parts["activations"] == pytest.approx(step, rel=0.1)
    assert est.need == pytest.approx(peak, rel=0.1)
    assert est.message().startswith(f"needs ≈ {est.need / memory.GB:.2f} GB of memory (model ")


def test_the_estimate_leaves_the_model_as_found(tiny_model, sample_dataset, tmp_path, live_tensor_bytes):
    parts = ldm_parts(tiny_model)
    settings = settings_for(sample_dataset, tmp_path, training_method="loha", dora=True, text_encoder_lr=1e-4,
                            gradient_checkpointing=True, color_aug=True)
    prepared = preflight(parts, settings)
    state = model_state(tiny_model)
    tensors = {name: (t, t.data_ptr(), t.device) for name, t in
               [*tiny_model.named_parameters(), *tiny_model.named_buffers()]}
    gc.collect()
    alive = live_tensor_bytes()
    memory.estimate(parts, settings, prepared=prepared)
    gc.collect()
    assert model_state(tiny_model) == state
    after = dict([*tiny_model.named_parameters(), *tiny_model.named_buffers()])
    assert after.keys() == tensors.keys()
    for name, (t, ptr, device) in tensors.items():
        assert after[name] is t and t.data_ptr() == ptr and t.device == device, name
    assert live_tensor_bytes() == alive  # nothing of the estimate is kept


def test_a_run_that_does_not_fit_is_refused_naming_what_would_fit(tiny_model, sample_dataset, tmp_path):
    parts = ldm_parts(tiny_model)
    heavy = settings_for(sample_dataset, tmp_path)
    prepared = preflight(parts, heavy)
    light = memory.estimate(parts, dataclasses.replace(heavy, gradient_checkpointing=True), prepared=prepared)
    unfit = memory.estimate(parts, heavy, prepared=prepared)
    assert light.need < unfit.need

    free = (light.need + unfit.need) // 2
    est = memory.estimate(parts, heavy, free, prepared=prepared)
    assert est.fits is False and est.free == free
    changes = {c.label: c for c in est.changes}
    assert changes["turn on gradient checkpointing"].need == light.need
    for change in est.changes:  # each change named fits, estimated the same way
        assert change.need <= free
        assert memory.estimate(parts, dataclasses.replace(heavy, **change.settings), prepared=prepared,
                               suggest=False).need == change.need
    message = memory.refusal(est, heavy)
    assert "turn on gradient checkpointing" in message and "ignore_memory_estimate" in message
    assert f"of your {free / memory.GB:.2f} GB free" in message
    assert memory.refusal(est, dataclasses.replace(heavy, ignore_memory_estimate=True)) is None
    assert memory.refusal(unfit, heavy) is None  # free memory unknown (a CPU host): reported, never refused
    assert memory.refusal(memory.estimate(parts, heavy, unfit.need, prepared=prepared), heavy) is None


@pytest.mark.skipif(not compat.FP8_DTYPES, reason="this torch has no float8 dtypes")
def test_the_fp8_change_is_the_estimate_of_the_model_held_in_fp8(tiny_model, sample_dataset, tmp_path,
                                                                 live_tensor_bytes, monkeypatch):
    """"FP8 weights" (a change offered on a GPU) estimates the model as the WebUI's FP8 option holds it: what the
    estimate of a model so held says, which is what a real run on it holds."""
    fp16 = hold_like_the_webui(copy.deepcopy(tiny_model), "fp16")
    fp8 = hold_like_the_webui(tiny_model, "fp8")
    settings = settings_for(sample_dataset, tmp_path, train_dtype="bf16")
    prepared = preflight(ldm_parts(fp8), settings)
    held = memory.estimate(ldm_parts(fp8), settings, prepared=prepared)
    assert memory._estimate(ldm_parts(fp16), settings, prepared, fp8=True).parts == held.parts
    peak, step = measured(ldm_parts(fp8), settings, live_tensor_bytes, monkeypatch)
    assert held.parts["activations"] == pytest.approx(step, rel=0.1)
    assert held.need == pytest.approx(peak, rel=0.1)


def test_ignore_memory_estimate_leaves_the_file_as_it_was(tiny_model, sample_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    parts = ldm_parts(tiny_model)
    files = [train(parts, settings_for(sample_dataset, tmp_path / str(ignore), ignore_memory_estimate=ignore)).file
             for ignore in (False, True)]
    assert files[0].read_bytes() == files[1].read_bytes()
    saved = [json.loads(f.with_name("estimated.lohatrain.json").read_text()) for f in files]
    assert "ignore_memory_estimate" not in saved[0] and saved[0].pop("output_dir") != saved[1].pop("output_dir")
    assert saved[0] == saved[1]


def test_the_command_line_prints_the_estimate_and_trains_nothing(tmp_path, capsys):
    assert cli.main(["train", "--demo", "--output-dir", str(tmp_path), "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "needs ≈" in out and "GB of memory (model" in out and "activations" in out
    assert not list(tmp_path.glob("*.safetensors"))


STATE_CASES = [("adamw", ""), ("adamw", "amsgrad=True"), ("adamw8bit", ""), ("prodigy", ""), ("lion", ""),
               ("adafactor", ""), ("adafactor", "beta1=0.9")]


@pytest.mark.parametrize("optimizer, args", STATE_CASES, ids=[f"{o}-{a}" if a else o for o, a in STATE_CASES])
def test_the_optimizer_state_counted_is_what_each_optimizer_keeps(tiny_model, sample_dataset, tmp_path, optimizer,
                                                                  args):
    """The state each optimizer's package really holds after a step, on the network a run trains (LoHa on the
    UNet and the text encoder: matrices, convolutions' kernels, DoRA's vectors; tensors on both sides of
    bitsandbytes' 4096-number limit)."""
    parts = ldm_parts(tiny_model)
    settings = settings_for(sample_dataset, tmp_path, training_method="loha", dora=True, conv_dim=4, conv_alpha=2,
                            text_encoder_lr=1.0 if optimizer == "prodigy" else 1e-4, optimizer=optimizer,
                            optimizer_args=args, learning_rate=1.0 if optimizer == "prodigy" else 1e-4)
    try:
        optimizers.check_device(settings, torch.device("cpu"))
    except LohatrainError as e:
        pytest.skip(str(e))
    network = trainer._network(parts, settings, 0, True, torch.device("cpu"))
    params = [p for g in trainer.param_groups(network, settings, parts.family) for p in g["params"]]
    assert {p.numel() >= 4096 for p in params} == {True, False}
    opt = optimizers.build(settings, trainer.param_groups(network, settings, parts.family), torch.device("cpu"))
    starts_at_zero = sum(p.numel() * p.element_size() for p in params if not p.any())
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    owners = defaultdict(set)  # storage -> the parameters whose state holds it (bitsandbytes shares its tables)
    for p, state in opt.state.items():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.dim() > 0:  # not the step counters
                owners[t.untyped_storage()._cdata, t.untyped_storage().nbytes()].add(id(p))
    held = sum(size for (_, size), ps in owners.items() if len(ps) == 1)
    counted = memory.optimizer_state_bytes(settings, params)
    if optimizer == "prodigy":  # p0 of a tensor that starts at zero is a scalar; counted in full
        assert starts_at_zero and held <= counted <= held + starts_at_zero
    else:
        assert counted == held
