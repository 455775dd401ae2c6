"""The memory estimate (lohatrain.memory) against what a real run holds, on the tiny SD1 and SDXL models: the same
parts, the same step, the same tracker; a run that does not fit is refused naming what would; nothing of the model
is loaded, copied or moved to decide."""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
from collections import OrderedDict, defaultdict

import pytest
import torch

from lohatrain import __main__ as cli
from lohatrain import compat, loop, memory, optimizers, trainer
from lohatrain.errors import LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.preflight import preflight
from lohatrain.settings import TrainSettings
from lohatrain.trainer import train

from runs import hold_like_the_webui, model_state


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
def test_the_estimate_is_what_a_real_step_holds(family_model, sample_dataset, tmp_path, live_tensor_bytes,
                                                 monkeypatch, family, overrides):
    parts = ldm_parts(family_model)
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


def test_the_same_model_and_settings_are_estimated_once_and_a_change_anew(tiny_model, sample_dataset, tmp_path,
                                                                         monkeypatch):
    """Fit my card and then Train (or a refusal and then Fit my card) estimate the same settings again: the step
    on fakes runs once for them; a change of the settings, of the model's dtypes or of its attention's forward
    (the WebUI swaps it when its cross-attention optimization changes) is estimated anew."""
    from ldm.modules.attention import CrossAttention

    monkeypatch.setattr(memory, "_RUNS", OrderedDict())
    monkeypatch.setattr(memory, "_ENCODINGS", OrderedDict())
    runs = []
    real_run = memory._run
    monkeypatch.setattr(memory, "_run", lambda *args: runs.append(args[1]) or real_run(*args))
    settings = settings_for(sample_dataset, tmp_path, batch_size=1, train_dtype="bf16")
    prepared = preflight(ldm_parts(tiny_model), settings)
    first = memory.estimate(ldm_parts(tiny_model), settings, prepared=prepared)
    assert memory.estimate(ldm_parts(tiny_model), settings, prepared=prepared).parts == first.parts
    assert len(runs) == 1
    wider = memory.estimate(ldm_parts(tiny_model), dataclasses.replace(settings, batch_size=2), prepared=prepared)
    assert len(runs) == 2 and wider.parts["activations"] > first.parts["activations"]
    # the caching pass's peak, kept from the first (the batch size does not change it), is what it measures anew
    assert len(memory._ENCODINGS) == 1
    memory._RUNS.clear()
    memory._ENCODINGS.clear()
    assert memory.estimate(ldm_parts(tiny_model), dataclasses.replace(settings, batch_size=2),
                           prepared=prepared).parts == wider.parts
    assert len(runs) == 3

    real_forward = CrossAttention.forward
    monkeypatch.setattr(CrossAttention, "forward", lambda self, x, context=None, mask=None: real_forward(
        self, x * torch.ones_like(x), context, mask))  # the ones are kept for backward: more activations
    more = memory.estimate(ldm_parts(tiny_model), settings, prepared=prepared)
    assert len(runs) == 4 and more.parts["activations"] > first.parts["activations"]
    monkeypatch.setattr(CrossAttention, "forward", real_forward)

    halved = memory.estimate(ldm_parts(hold_like_the_webui(tiny_model, "fp16")), settings, prepared=prepared)
    assert len(runs) == 5 and halved.parts["model"] < first.parts["model"]


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
    # the recipe's first change is enough, and is what the run with it needs
    assert [(s.label, s.settings, s.need) for s in est.fit.steps] == [
        ("gradient checkpointing on", {"gradient_checkpointing": True}, light.need)]
    assert est.fit.fits and est.fit.settings == {"gradient_checkpointing": True}
    message = memory.refusal(est, heavy)
    assert message.startswith(f"This run needs ≈ {unfit.need / memory.GB:.2f} GB of your {free / memory.GB:.2f} GB "
                              "free (model ")
    assert f"To fit: gradient checkpointing on (≈ {light.need / memory.GB:.2f} GB)." in message
    assert "Fit my card" in message and "ignore_memory_estimate" in message
    assert est.to_dict()["fit"]["steps"][0]["settings"] == {"gradient_checkpointing": True}
    assert memory.refusal(est, dataclasses.replace(heavy, ignore_memory_estimate=True)) is None
    assert memory.refusal(unfit, heavy) is None  # free memory unknown (a CPU host): reported, never refused
    fitting = memory.estimate(parts, heavy, unfit.need, prepared=prepared)
    assert fitting.fit is None and memory.refusal(fitting, heavy) is None  # it fits: nothing to change


def test_the_recipe_goes_through_its_changes_in_order_until_the_run_fits(tiny_model, sample_dataset, tmp_path):
    """A card that the run fits only with every change of the recipe and batch size 1: each change is taken in
    the recipe's order, each lowers the need, and the settings the recipe gives estimate at its figure, under the
    card's memory."""
    parts = ldm_parts(tiny_model)
    heavy = settings_for(sample_dataset, tmp_path, batch_size=4, text_encoder_lr=1e-4, shuffle_tags=True,
                         color_aug=True)
    prepared = preflight(parts, heavy)
    light = dataclasses.replace(heavy, gradient_checkpointing=True, text_encoder_lr=0.0, shuffle_tags=False,
                                color_aug=False, optimizer="adamw8bit", batch_size=1)
    free = memory.estimate(parts, light, prepared=prepared).need
    options = memory.FitOptions(why_no_8bit=lambda device: None)  # as on a card bitsandbytes runs on
    recipe = memory.fit(parts, heavy, free, prepared=prepared, options=options)
    assert [s.label.split(" (")[0].split(",")[0] for s in recipe.steps] == [
        "gradient checkpointing on", "captions encoded once", "color_aug off", "the 8-bit optimizer adamw8bit",
        "batch size 1"]
    needs = [memory.estimate(parts, heavy, prepared=prepared).need, *(s.need for s in recipe.steps)]
    assert needs == sorted(needs, reverse=True) and len(set(needs)) == len(needs)
    assert recipe.fits and recipe.need == free and not recipe.notes
    fitted = dataclasses.replace(heavy, **recipe.settings)
    assert fitted == light
    assert memory.estimate(parts, fitted, free, prepared=prepared).fits is True
    assert recipe.message().startswith("To fit: gradient checkpointing on (≈ ")

    # one byte less: nothing lohatrain can change makes it fit, and the recipe says so
    short = memory.fit(parts, heavy, free - 1, prepared=prepared, options=options)
    assert not short.fits and short.settings == recipe.settings
    assert "no setting lohatrain can change makes it fit" in short.message()


def test_the_recipe_says_what_it_cannot_change(tiny_model, sample_dataset, tmp_path):
    """The 8-bit optimizer where bitsandbytes cannot run, a setting the caller cannot change, and FP8 weights (the
    WebUI's own option, estimated here for a GPU: named as a step of the recipe, never changed by it)."""
    parts = ldm_parts(tiny_model)
    settings = settings_for(sample_dataset, tmp_path, train_dtype="bf16", gradient_checkpointing=True)
    prepared = preflight(parts, settings)
    need = memory.estimate(parts, settings, prepared=prepared).need
    recipe = memory.fit(parts, settings, need - 1, prepared=prepared, options=memory.FitOptions(
        why_no_8bit=lambda device: "no 8-bit kernels for this CPU", changeable=frozenset({"resolution"})))
    assert [s.label for s in recipe.steps] == [] and not recipe.fits
    assert recipe.notes == ["the 8-bit optimizer (adamw8bit) is left out: no 8-bit kernels for this CPU",
                            "batch size: batch_size cannot be set here"]
    assert "The 8-bit optimizer (adamw8bit) is left out: no 8-bit kernels for this CPU." in recipe.message()
    if not compat.FP8_DTYPES:
        return
    on_gpu = memory.estimate(parts, settings, device="cuda", prepared=prepared)
    held = sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in [
        *tiny_model.parameters(), *tiny_model.buffers()]}.values())
    assert on_gpu.device == "cuda"  # the whole model counted on the card while the images are encoded
    assert on_gpu.parts["model"] == held if on_gpu.phase == "caching" else on_gpu.parts["model"] + on_gpu.host >= held
    fp8 = memory.fit(parts, settings, on_gpu.need - 1, prepared=prepared, device="cuda", options=memory.FitOptions(
        fp8_setting="Settings → FP8 weight", why_no_8bit=lambda device: "not here"))
    step = fp8.steps[0]
    assert step.label.startswith("the weights stored in FP8 (Settings → FP8 weight: the WebUI's own setting")
    assert (step.settings, step.host_setting) == ({}, "Settings → FP8 weight") and fp8.fits
    assert step.need == memory._estimate(parts, settings, prepared, fp8=True, device="cuda").need < on_gpu.need
    assert memory.fit(parts, settings, on_gpu.need - 1, prepared=prepared, device="cuda").notes[-1] == (
        "FP8 storage of the frozen weights (the WebUI's FP8 weight option) is not available here")


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
