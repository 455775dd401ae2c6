"""The optimizers (lohatrain/optimizers.py) on the tiny real SD1 model, each from its own package: each trains, each
resumes to the same bytes as an uninterrupted run, Prodigy's adapted step size is kept and reported, the file names
the optimizer as kohya's tools do, and every wrong optimizer argument is refused with what to write instead."""
from __future__ import annotations

import copy
import importlib
import json
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain import optimizers
from lohatrain.errors import LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.methods import TYPES
from lohatrain.preflight import preflight
from lohatrain.run_state import read_state
from lohatrain.settings import SettingsError, TrainSettings
from lohatrain.trainer import Hooks, train

from host_rules import apply_file
from runs import denoising_loss, resume_run, settings_for, stopping_at

# Prodigy starts from a step size of d0 and grows it from what the steps show; in a short test run it must start
# nearer the size it finds (d0), with kohya's usual betas for it.
PRODIGY = dict(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=2.0, optimizer_args="d0=1e-3 betas=0.9,0.99")
# bitsandbytes keeps tensors under 4096 values in 32 bits; the tiny network's are smaller, so this makes its 8-bit
# state (and its blockwise quantisation) what is trained and resumed.
EIGHT_BIT = dict(optimizer="adamw8bit", optimizer_args="min_8bit_size=16")


def eight_bit_refusal() -> str | None:
    """Why this machine cannot train with AdamW 8-bit on the CPU, or None."""
    try:
        optimizers.check_device(TrainSettings(optimizer="adamw8bit"), torch.device("cpu"))
    except LohatrainError as e:
        return str(e)
    return None


def needs_eight_bit(kw: dict):
    if kw.get("optimizer") != "adamw8bit":
        return ()
    reason = eight_bit_refusal()
    return (pytest.mark.skipif(reason is not None, reason=f"bitsandbytes cannot run here: {reason}"),)


def case(name: str, **kw):
    return pytest.param(kw, id=name, marks=needs_eight_bit(kw))


pytestmark = pytest.mark.usefixtures("fixed_clock")


@pytest.mark.parametrize("kw", [
    case("adamw8bit", steps=6, learning_rate=2e-2, **EIGHT_BIT),
    case("prodigy", steps=8, **{**PRODIGY, "optimizer_args": "d0=1e-2 betas=0.9,0.99"}),
    case("lion", steps=6, optimizer="lion", learning_rate=2e-2),
    # its relative step, min(1e-2, 1/sqrt(step)), unscaled: scaled by the weights' size a zero-initialised factor
    # would take steps of 1e-5 (transformers' eps)
    case("adafactor-relative", steps=10, optimizer="adafactor", optimizer_args="scale_parameter=False"),
    case("adafactor-fixed", steps=6, optimizer="adafactor", adafactor_relative_step=False, learning_rate=2e-2),
])
def test_each_optimizer_lowers_the_loss(tiny_model, sample_dataset, tmp_path, kw):
    fresh = copy.deepcopy(tiny_model)
    before = denoising_loss(fresh, sample_dataset)
    seen = []
    result = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, **kw), Hooks(progress=seen.append))
    assert apply_file(fresh, load_file(result.file)) == []
    after = denoising_loss(fresh, sample_dataset)
    assert after < 0.95 * before, (before, after)
    if kw.get("optimizer_args") == "scale_parameter=False":  # the progress shows the step size Adafactor took
        assert {p.lr for p in seen if p.stage == "Training"} == {0.01}


@pytest.mark.parametrize("kw", [
    case("adamw8bit", learning_rate=1e-2, text_encoder_lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=1,
         **EIGHT_BIT),
    case("prodigy", text_encoder_lr=1.0, prodigy_bias_correction=True, prodigy_safeguard_warmup=True,
         weight_decay=0.01, lr_scheduler="cosine", lr_warmup_steps=1, **PRODIGY),
    case("lion", optimizer="lion", learning_rate=1e-3, text_encoder_lr=1e-4, weight_decay=0.1,
         lr_scheduler="cosine", lr_warmup_steps=1),
    case("adafactor-relative", optimizer="adafactor", text_encoder_lr=1e-3),
    case("adafactor-fixed", optimizer="adafactor", adafactor_relative_step=False, learning_rate=1e-2,
         text_encoder_lr=1e-3, lr_scheduler="cosine", lr_warmup_steps=1, optimizer_args="beta1=0.9"),
])
def test_a_stopped_run_resumes_to_the_uninterrupted_runs_bytes(tiny_model, sample_dataset, tmp_path, kw):
    """Each optimizer's whole state travels with the run: its tensors, its step counters (plain numbers),
    bitsandbytes' 8-bit buffers and quantisation maps, Prodigy's step size in its groups."""
    kw = dict(steps=4, flip_aug=True, **kw)
    reference = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "whole", **kw))
    stopped = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "stopped", **kw),
                    stopping_at(2))
    assert stopped.steps_done == 2
    result = resume_run(copy.deepcopy(tiny_model), tmp_path / "stopped")
    assert result.file.read_bytes() == reference.file.read_bytes()


def test_prodigys_adapted_step_size_is_in_the_state_the_file_and_the_progress(tiny_model, sample_dataset, tmp_path):
    seen, hooks = [], stopping_at(9)
    hooks.progress = seen.append
    s = settings_for(sample_dataset, tmp_path, steps=10, optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=2.0,
                     weight_decay=0.01)
    result = train(ldm_parts(tiny_model), s, hooks)
    assert result.status == "interrupted" and result.steps_done == 9
    d = read_state(tmp_path / "test-loha.lohatrain-state").info["optimizer_groups"][0]["d"]
    assert d > 10 * 1e-6  # grown from Prodigy's d0
    with safe_open(result.file, "pt") as f:
        meta = f.metadata()
    assert float(meta["lohatrain_prodigy_d"]) == d
    assert meta["ss_optimizer"] == "prodigyopt.prodigy.Prodigy(weight_decay=0.01,d_coef=2.0)"  # kohya's form
    assert [p.lr for p in seen if p.stage == "Training"][-1] == d * 1.0  # the step it takes: d × learning rate


def test_the_file_names_the_optimizer_as_kohyas_tools_do(tiny_model, sample_dataset, tmp_path):
    default = train(ldm_parts(copy.deepcopy(tiny_model)), settings_for(sample_dataset, tmp_path / "default", steps=1))
    lion = train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "lion", steps=1, optimizer="lion",
                                                     weight_decay=0.1, optimizer_args="betas=0.95,0.98"))
    metas = []
    for result in (default, lion):
        with safe_open(result.file, "pt") as f:
            metas.append(f.metadata())
    assert metas[0]["ss_optimizer"] == "torch.optim.AdamW"  # as every file before optimizers could be chosen
    assert "lohatrain_prodigy_d" not in metas[0]
    assert not {"optimizer", "optimizer_args", "weight_decay"} & set(json.loads(metas[0]["lohatrain_settings"]))
    assert metas[1]["ss_optimizer"] == "lion_pytorch.lion_pytorch.Lion(weight_decay=0.1,betas=(0.95, 0.98))"
    recorded = json.loads(metas[1]["lohatrain_settings"])
    assert (recorded["optimizer"], recorded["weight_decay"]) == ("lion", 0.1)


@pytest.mark.parametrize("name", [n for n in optimizers.OPTIMIZERS if n != "adamw"])
def test_the_kohya_names_are_the_classes_own(name):
    """kohya writes `optimizer_class.__module__ + "." + optimizer_class.__name__`; AdamW keeps lohatrain's own name,
    which every file before had."""
    chosen = optimizers.OPTIMIZERS[name]
    if importlib.util.find_spec(chosen.module.split(".")[0]) is None:
        pytest.skip(f"{chosen.package} is not installed")
    cls = getattr(importlib.import_module(chosen.module), chosen.attribute)
    assert f"{cls.__module__}.{cls.__name__}" == chosen.kohya_name


@pytest.mark.parametrize("given,expected", [
    (dict(optimizer="sgd"), ["optimizer must be one of adamw, adamw8bit, prodigy, lion, adafactor, not 'sgd'"]),
    (dict(optimizer_args="weight_decay eps=abc lr=1 eps=1e-6 eps=1e-7"), [
        "optimizer_args: 'weight_decay' must be name=value, e.g. weight_decay=0.05",
        "optimizer_args: eps=abc is not a number, True/False, None or numbers separated by commas",
        "optimizer_args: lr cannot be given here; it is set by learning_rate (and text_encoder_lr)",
        "optimizer_args: eps is given twice"]),
    (dict(optimizer="prodigy", prodigy_d_coef=3.0, optimizer_args="d_coef=2"), [
        "optimizer_args: d_coef=2 contradicts prodigy_d_coef (which gives d_coef=3.0): set it in one place"]),
    (dict(optimizer="prodigy", learning_rate=1e-4, text_encoder_lr=1e-4), [
        "learning_rate must be about 1.0 with prodigy, not 0.0001: Prodigy finds the step size itself and the "
        "learning rate only scales it (tune prodigy_d_coef instead)"]),
    (dict(optimizer="prodigy", text_encoder_lr=0.5), [
        "text_encoder_lr must be 0 (off) or the same as learning_rate with prodigy: it adapts one step size for the "
        "whole network"]),
    (dict(optimizer="adafactor", lr_scheduler="cosine"), [
        "adafactor with a relative step sets its own step size (1/sqrt(step)), so lr_scheduler must be constant and "
        "lr_warmup_steps 0; or turn adafactor_relative_step off to train with the learning rate and its schedule"]),
    (dict(weight_decay=-0.1, prodigy_d_coef=0), ["weight_decay must be at least 0 and at most 10, not -0.1",
                                                 "prodigy_d_coef must be above 0 and at most 100, not 0"]),
])
def test_settings_that_cannot_work_are_refused_each_with_what_to_write(sample_dataset, given, expected):
    with pytest.raises(SettingsError) as refused:
        TrainSettings.from_dict({"dataset_dir": str(sample_dataset), **given})
    assert refused.value.problems == expected


def test_prodigy_takes_learning_rates_of_one_unless_given(sample_dataset):
    chosen = TrainSettings.from_dict({"dataset_dir": str(sample_dataset), "optimizer": "prodigy"}, family="sdxl")
    assert (chosen.learning_rate, chosen.text_encoder_lr) == (1.0, 0.0)
    assert TrainSettings.from_dict({"dataset_dir": str(sample_dataset), "optimizer": "lion"}).learning_rate == 1e-3


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("name", list(optimizers.OPTIMIZERS))
def test_the_suggested_rate_suits_each_optimizer_and_a_run_accepts_it(sample_dataset, name, family):
    """What the tab's Apply puts into the form, from the type's usual AdamW rate: a rate the settings accept."""
    for method in TYPES:
        usual = TYPES[method].learning_rate_for(family)
        for relative_step in (True, False):
            rate, why = optimizers.suggested_rate(name, usual, relative_step)
            expected = {"prodigy": optimizers.PRODIGY_LR, "lion": usual / 3}.get(name, usual)
            assert rate == pytest.approx(expected) and why
            TrainSettings.from_dict({"dataset_dir": str(sample_dataset), "optimizer": name, "learning_rate": rate,
                                     "training_method": method, "adafactor_relative_step": relative_step}, family)
    assert ("unused" in optimizers.suggested_rate(name, 1e-3)[1]) == (name == "adafactor")


@pytest.mark.parametrize("given,expected", [
    (dict(optimizer="prodigy", optimizer_args="d_coeff=2"), [
        "optimizer_args: prodigy has no argument 'd_coeff' (did you mean d_coef?); it takes betas, beta3, eps, "
        "weight_decay, decouple, use_bias_correction, safeguard_warmup, d0, d_coef, growth_rate, fsdp_in_use, "
        "slice_p"]),
    (dict(optimizer="lion", optimizer_args="betas=0.9 use_triton=1"), [
        "optimizer_args: betas must be 2 numbers separated by commas, not 0.9",
        "optimizer_args: use_triton must be True or False, not 1"]),
    (dict(optimizer="adafactor", optimizer_args="decay_rate=fast"), [
        "optimizer_args: decay_rate=fast is not a number, True/False, None or numbers separated by commas"]),
    (dict(optimizer="prodigy", optimizer_args="betas=0.9,1.5"), [
        "optimizer_args: prodigy does not take these arguments (ValueError: Invalid beta parameter at index 1: 1.5)"]),
    (dict(optimizer="adafactor", optimizer_args="relative_step=False warmup_init=True"), [
        "optimizer_args: adafactor does not take these arguments (ValueError: `warmup_init=True` requires "
        "`relative_step=True`)"]),
])
def test_optimizer_args_are_checked_against_the_optimizers_own_arguments(tiny_model, sample_dataset, tmp_path, given,
                                                                        expected):
    s = settings_for(sample_dataset, tmp_path / "out",
                     **{"learning_rate": 1.0 if given["optimizer"] == "prodigy" else 1e-3, **given})
    with pytest.raises(SettingsError) as refused:
        preflight(ldm_parts(tiny_model), s)
    assert refused.value.problems == expected
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_package_is_named_before_the_run(tiny_model, sample_dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if it were not installed
    with pytest.raises(LohatrainError, match=r"^the optimizer prodigy needs the Python package prodigyopt, which is "
                                             r"not installed: restart the WebUI"):
        preflight(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, **PRODIGY))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None or eight_bit_refusal() is None,
                    reason="needs a bitsandbytes without an 8-bit optimizer for the CPU (the stock WebUI's torch "
                           "2.1 gets 0.45, which has none)")
def test_adamw8bit_where_bitsandbytes_cannot_run_is_refused_with_the_reason(tiny_model, sample_dataset, tmp_path):
    with pytest.raises(LohatrainError, match=r"^AdamW 8-bit cannot run on this CPU: bitsandbytes \S+ has no 8-bit "
                                             r"optimizer for it \(.+\)\. Choose adamw"):
        preflight(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path, **EIGHT_BIT))
