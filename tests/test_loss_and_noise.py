"""kohya's loss and noise options and masked loss (issue 21) on the tiny real SD1 model: each option changes the
trained file and writes kohya's metadata key; each helper matches its published formula on fixed tensors; with
every option off the file and the random draws are what they were before the options existed.

What masked loss promises (kohya's `masked_loss` / `alpha_mask` as well): the error outside the mask does not
count, so nothing is learned *from* the background. The UNet still sees the whole noisy latent as context, and the
VAE (its middle block attends over the whole image) mixes every pixel into every latent, so changing background
pixels changes what the model sees everywhere: the exact promises are tested where they hold: in the loss (the
prediction outside the mask has no effect and no gradient) and in the file for an image whose mask is all black
(its pixels change nothing at all) or all white (the same file as without masked loss).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from lohatrain import dataset as ds
from lohatrain import doctor, loop
from lohatrain.cache import cache_latents, latent_mask
from lohatrain.cli_settings import add_setting_options, given_settings
from lohatrain.errors import DatasetError, LohatrainError
from lohatrain.families import ldm_parts
from lohatrain.run_state import SavedRun, dataset_fingerprint
from lohatrain.settings import SettingsError, TrainSettings
from lohatrain.trainer import train

from runs import settings_for as _settings_for
from runs import resume_run, square_mask, stopping_at, write_dataset

NEW_SETTINGS = ("masked_loss", "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
                "debiased_estimation_loss", "loss_type", "huber_schedule", "huber_c", "huber_scale", "min_timestep",
                "max_timestep")
NEW_KEYS = ("ss_multires_noise_iterations", "ss_multires_noise_discount", "ss_ip_noise_gamma", "ss_debiased_estimation",
            "ss_loss_type", "ss_huber_schedule", "ss_huber_c", "ss_huber_scale", "modelspec.timestep_range")
# option → kohya's metadata keys it writes
VARIANTS = {
    "multires": ({"multires_noise_iterations": 6, "multires_noise_discount": 0.2},
                 {"ss_multires_noise_iterations": "6", "ss_multires_noise_discount": "0.2"}),
    "ip_noise": ({"ip_noise_gamma": 0.1}, {"ss_ip_noise_gamma": "0.1"}),
    "debiased": ({"debiased_estimation_loss": True}, {"ss_debiased_estimation": "True"}),
    "l1": ({"loss_type": "l1"}, {"ss_loss_type": "l1"}),
    "huber_snr": ({"loss_type": "huber"}, {"ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.1",
                                           "ss_huber_scale": "1.0"}),
    "huber_exponential": ({"loss_type": "huber", "huber_schedule": "exponential", "huber_c": 0.2, "huber_scale": 2.0},
                          {"ss_loss_type": "huber", "ss_huber_schedule": "exponential", "ss_huber_c": "0.2",
                           "ss_huber_scale": "2.0"}),
    "smooth_l1_constant": ({"loss_type": "smooth_l1", "huber_schedule": "constant"},
                           {"ss_loss_type": "smooth_l1", "ss_huber_schedule": "constant", "ss_huber_c": "0.1",
                            "ss_huber_scale": "1.0"}),
    "timesteps": ({"min_timestep": 200, "max_timestep": 600}, {"modelspec.timestep_range": "200,600"}),
}


pytestmark = pytest.mark.usefixtures("fixed_clock")


def settings_for(dataset: Path, out: Path, **overrides) -> TrainSettings:
    """A 3-step run named "loss"."""
    return _settings_for(dataset, out, **{"name": "loss", "steps": 3, **overrides})


def run(model, settings: TrainSettings) -> tuple[dict, dict, list[int]]:
    """Train; the file's tensors and metadata, and every timestep the model was asked to denoise."""
    parts = ldm_parts(copy.deepcopy(model))
    ldm_predict, seen = parts.predict, []

    def predict(noisy, timesteps, cond):
        seen.extend(timesteps.tolist())
        return ldm_predict(noisy, timesteps, cond)

    result = train(dataclasses.replace(parts, predict=predict), settings)
    with safe_open(result.file, "pt") as f:
        return load_file(result.file), f.metadata(), seen


@pytest.fixture(scope="module")
def baseline(_tiny_model_template, tmp_path_factory):
    """The sample dataset and the run with every option off."""
    from lohatrain.demo import make_sample_dataset

    folder = tmp_path_factory.mktemp("loss")
    dataset = make_sample_dataset(folder / "dataset")
    return dataset, run(_tiny_model_template, settings_for(dataset, folder / "plain"))


def test_with_every_option_off_the_file_records_none_of_them(baseline):
    _, (_, meta, timesteps) = baseline
    assert not set(NEW_KEYS) & set(meta)
    assert not set(NEW_SETTINGS) & set(json.loads(meta["lohatrain_settings"]))
    assert len(timesteps) == 6 and all(0 <= t < 1000 for t in timesteps)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_option_changes_the_trained_file_and_writes_kohyas_keys(_tiny_model_template, baseline, tmp_path,
                                                                     variant):
    dataset, (plain, _, _) = baseline
    options, keys = VARIANTS[variant]
    tensors, meta, timesteps = run(_tiny_model_template, settings_for(dataset, tmp_path, **options))
    assert tensors.keys() == plain.keys()
    assert any(not torch.equal(tensors[k], plain[k]) for k in plain), variant
    assert {k: meta.get(k) for k in NEW_KEYS if k in meta} == keys
    recorded = json.loads(meta["lohatrain_settings"])
    assert {k: recorded[k] for k in options} == options
    if variant == "timesteps":
        assert len(timesteps) == 6 and all(200 <= t < 600 for t in timesteps)


def test_with_the_options_off_the_draws_are_the_plain_ones():
    """The same generator calls in the same order as before the options existed (the offset's too)."""
    shape = (2, 4, 8, 8)
    for offset in (0.0, 0.1):
        settings = dataclasses.replace(TrainSettings(), noise_offset=offset)
        ours, plain = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        noise = loop.draw_noise(settings, ours, shape)
        timesteps = loop.draw_timesteps(settings, 1000, 2, ours)
        expected = torch.randn(shape, generator=plain)
        if offset:
            expected += offset * torch.randn((2, 4, 1, 1), generator=plain)
        assert torch.equal(noise, expected)
        assert torch.equal(timesteps, torch.randint(0, 1000, (2,), generator=plain))
        assert torch.equal(ours.get_state(), plain.get_state())


def test_timesteps_stay_within_min_and_max_over_many_draws():
    gen = torch.Generator().manual_seed(0)
    draws = loop.draw_timesteps(dataclasses.replace(TrainSettings(), min_timestep=250, max_timestep=300), 1000,
                                100_000, gen)
    assert draws.min().item() == 250 and draws.max().item() == 299  # both ends, nothing beyond
    counts = torch.bincount(draws - 250)
    assert counts.min().item() > 0.8 * 100_000 / 50  # uniform: every value about 2,000 times
    last = loop.draw_timesteps(dataclasses.replace(TrainSettings(), min_timestep=999), 1000, 1000, gen)
    assert torch.equal(last, torch.full((1000,), 999))


def bilinear(size_in: int, size_out: int) -> torch.Tensor:
    """The matrix of bilinear resampling with half-pixel centres (align_corners=False), from its definition."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for o in range(size_out):
        src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        low = int(src)
        high, frac = min(low + 1, size_in - 1), src - low
        matrix[o, low] += 1 - frac
        matrix[o, high] += frac
    return matrix


def test_multires_noise_is_the_pyramid_of_its_definition():
    """Level i: Gaussian noise r^i times coarser (r drawn in [2, 4)), upsampled bilinearly, weighted discount^i,
    stopping at a 1-pixel side; the sum scaled to unit standard deviation."""
    noise = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    ours = loop.pyramid_noise(noise.clone(), 6, 0.3, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    total, levels = noise.double(), 0
    for i in range(6):
        r = 2 + 2 * torch.rand((), generator=gen, dtype=torch.float64).item()
        h, w = max(1, int(12 / r ** i)), max(1, int(16 / r ** i))
        level = torch.randn((2, 4, h, w), generator=gen).double()
        total = total + bilinear(h, 12) @ level @ bilinear(w, 16).T * 0.3 ** i
        levels += 1
        if 1 in (h, w):
            break
    assert 2 < levels < 6  # it stopped at the 1-pixel level
    torch.testing.assert_close(ours, (total / total.std()).float(), atol=1e-5, rtol=1e-5)


def test_input_perturbation_noises_the_input_more_but_keeps_the_target():
    gen = torch.Generator().manual_seed(2)
    latents, noise, extra = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    ac = torch.tensor([0.9, 0.2]).view(-1, 1, 1, 1)
    for v_prediction in (False, True):
        noisy, target = loop.noisy_and_target(latents, noise, ac, v_prediction, 0.1 * extra)
        torch.testing.assert_close(noisy, ac.sqrt() * latents + (1 - ac).sqrt() * (noise + 0.1 * extra))
        plain_noisy, plain_target = loop.noisy_and_target(latents, noise, ac, v_prediction)
        assert torch.equal(target, plain_target)
        torch.testing.assert_close(plain_target, ac.sqrt() * noise - (1 - ac).sqrt() * latents if v_prediction
                                   else noise)
        assert not torch.allclose(noisy, plain_noisy)


def sd_schedule() -> torch.Tensor:
    """SD's scaled-linear ᾱ over 1000 timesteps."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_debiased_estimation_weights_by_one_over_the_root_of_snr_capped_at_1000():
    ac_all = sd_schedule()
    timesteps = torch.tensor([0, 10, 500, 999])
    ac = ac_all[timesteps].double()
    snr = (ac / (1 - ac)).clamp(max=1000)
    assert snr[0] == 1000  # timestep 0's SNR (about 1,175) is capped
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    for v_prediction, weight in ((False, 1 / snr.sqrt()), (True, 1 / (snr + 1))):
        settings = dataclasses.replace(TrainSettings(), debiased_estimation_loss=True)
        ours = loop.weighted_by_snr(loss, ac_all[timesteps], settings, v_prediction)
        torch.testing.assert_close(ours.double(), loss.double() * weight, rtol=1e-5, atol=0)
        both = loop.weighted_by_snr(loss, ac_all[timesteps], dataclasses.replace(settings, min_snr_gamma=5.0),
                                    v_prediction)
        raw = ac / (1 - ac)
        min_snr = raw.clamp(max=5) / (raw + 1 if v_prediction else raw)
        torch.testing.assert_close(both.double(), loss.double() * min_snr * weight, rtol=1e-5, atol=0)


def test_huber_and_smooth_l1_follow_kohyas_schedules_and_formulas():
    ac_all = sd_schedule()
    timesteps = torch.tensor([0, 250, 999])
    gen = torch.Generator().manual_seed(4)
    prediction, target = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    d = (prediction - target).double()
    ac = ac_all[timesteps].double()
    sigma = ((1 - ac) / ac).sqrt()
    thresholds = {"snr": 0.9 / (1 + sigma) ** 2 + 0.1,  # (1 - c)/(1 + σ)² + c; it takes no scale
                  "exponential": 2.0 * 0.1 ** (timesteps.double() / 1000),  # scale · c^(t/T)
                  "constant": torch.full((3,), 2.0 * 0.1, dtype=torch.float64)}
    for schedule, c in thresholds.items():
        settings = dataclasses.replace(TrainSettings(), huber_schedule=schedule, huber_c=0.1, huber_scale=2.0)
        torch.testing.assert_close(loop.huber_threshold(settings, timesteps, ac_all).double(), c, rtol=1e-5, atol=0)
        c = c.view(-1, 1, 1, 1)
        expected = {"huber": 2 * c * ((d ** 2 + c ** 2).sqrt() - c), "smooth_l1": 2 * ((d ** 2 + c ** 2).sqrt() - c),
                    "l1": d.abs(), "l2": d ** 2}
        for loss_type, reference in expected.items():
            ours = loop.elementwise_loss(prediction, target, dataclasses.replace(settings, loss_type=loss_type),
                                         timesteps, ac_all)
            torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-6)  # float32 cancellation
    snr_c = thresholds["snr"]
    assert 0.9 < snr_c[0] and snr_c[0] > snr_c[1] > snr_c[2] and snr_c[2] < 0.11  # from about 1 down to huber_c
    # pseudo-Huber: about the squared error well below c, about 2c·|error| well above
    settings = dataclasses.replace(TrainSettings(), loss_type="huber", huber_schedule="constant", huber_c=0.5)
    small, large = torch.full((1, 1, 1, 1), 1e-2), torch.full((1, 1, 1, 1), 1e3)
    zero, t = torch.zeros(1, 1, 1, 1), torch.tensor([0])
    assert loop.elementwise_loss(small, zero, settings, t, ac_all).item() == pytest.approx(1e-4, rel=1e-2)
    assert loop.elementwise_loss(large, zero, settings, t, ac_all).item() == pytest.approx(1e3, rel=1e-3)


def test_a_run_with_every_option_on_resumes_to_the_same_file(_tiny_model_template, tmp_path):
    masked = tmp_path / "masked"
    write_dataset(masked, {0: square_mask(16, 48), 2: square_mask(0, 32)})
    every = dict(steps=4, multires_noise_iterations=4, ip_noise_gamma=0.05, debiased_estimation_loss=True,
                 loss_type="huber", min_timestep=100, max_timestep=900, masked_loss=True, flip_aug=True)
    whole = train(ldm_parts(copy.deepcopy(_tiny_model_template)), settings_for(masked, tmp_path / "whole", **every))
    stopped = train(ldm_parts(copy.deepcopy(_tiny_model_template)), settings_for(masked, tmp_path / "out", **every),
                    stopping_at(2))
    assert stopped.status == "interrupted"
    resumed = resume_run(copy.deepcopy(_tiny_model_template), tmp_path / "out", name="loss")
    assert resumed.file.read_bytes() == whole.file.read_bytes()


# --- settings, command line ------------------------------------------------------------------------------------------

def test_bad_values_are_refused_each_naming_its_setting():
    bad = dict(multires_noise_iterations=-1, multires_noise_discount=0.0, ip_noise_gamma=-0.1, loss_type="cauchy",
               huber_schedule="linear", huber_c=0.0, huber_scale=-1.0)
    with pytest.raises(SettingsError) as refused:
        TrainSettings.from_dict({"dataset_dir": "x", **bad, "min_timestep": 700, "max_timestep": 300})
    problems = refused.value.problems
    assert len(problems) == len(bad) + 1
    for key in bad:
        assert sum(p.startswith(key) for p in problems) == 1, (key, problems)
    assert "min_timestep (700) must be below max_timestep (300)" in problems
    with pytest.raises(SettingsError, match="max_timestep must be between 1 and 1000"):
        TrainSettings.from_dict({"dataset_dir": "x", "max_timestep": 1001})


def test_the_command_line_takes_every_option_by_kohyas_name():
    parser = argparse.ArgumentParser()
    add_setting_options(parser)
    args = parser.parse_args(["--masked-loss", "--multires-noise-iterations", "8", "--multires-noise-discount", "0.2",
                              "--ip-noise-gamma", "0.1", "--debiased-estimation-loss", "--loss-type", "smooth_l1",
                              "--huber-schedule", "exponential", "--huber-c", "0.3", "--huber-scale", "1.5",
                              "--min-timestep", "10", "--max-timestep", "900"])
    settings = TrainSettings.from_dict({"dataset_dir": "x", **given_settings(args)})
    assert (settings.masked_loss, settings.multires_noise_iterations, settings.multires_noise_discount,
            settings.ip_noise_gamma, settings.debiased_estimation_loss, settings.loss_type, settings.huber_schedule,
            settings.huber_c, settings.huber_scale, settings.min_timestep, settings.max_timestep) == (
        True, 8, 0.2, 0.1, True, "smooth_l1", "exponential", 0.3, 1.5, 10, 900)
    help_text = parser.format_help()
    assert all(f"--{name.replace('_', '-')}" in help_text for name in NEW_SETTINGS)


# --- masked loss -----------------------------------------------------------------------------------------------------

def file_of(model, settings: TrainSettings) -> bytes:
    return train(ldm_parts(copy.deepcopy(model)), settings).file.read_bytes()


def test_an_all_black_mask_trains_nothing_from_its_image_and_an_all_white_one_changes_nothing(
        _tiny_model_template, tmp_path):
    black, white = Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 255)
    model, files = _tiny_model_template, {}
    for pixels in (0, 1):  # image 0 with other pixels entirely
        for masked_loss in (False, True):
            data = write_dataset(tmp_path / f"{pixels}-{masked_loss}" / "data", {0: black}, pixels_seed=pixels)
            files[pixels, masked_loss] = file_of(model, settings_for(data, tmp_path / f"out-{pixels}-{masked_loss}",
                                                                     steps=2, masked_loss=masked_loss))
    assert files[0, True] == files[1, True]  # image 0's pixels changed nothing: whole file, byte for byte
    assert files[0, False] != files[1, False]  # without masked loss they are trained
    assert files[0, True] != files[0, False]

    data = write_dataset(tmp_path / "white" / "data", {i: white for i in range(4)})
    all_white = load_file(train(ldm_parts(copy.deepcopy(model)),
                                settings_for(data, tmp_path / "out-white", steps=2, masked_loss=True)).file)
    unmasked = train(ldm_parts(copy.deepcopy(model)), settings_for(data, tmp_path / "out-plain", steps=2)).file
    assert all_white.keys() == load_file(unmasked).keys()
    assert all(torch.equal(all_white[k], v) for k, v in load_file(unmasked).items())


def test_alpha_and_a_mask_file_give_the_same_mask_averaged_over_each_latent_pixel(tmp_path):
    """A square from pixel 12 to 52: latent pixels 2..5 lie inside it, 1 and 6 half inside (pixels 8–15 and
    48–55), 0 and 7 outside."""
    square = square_mask(12, 52)
    rgba = Image.new("RGBA", (64, 64), (200, 30, 30, 255))
    rgba.putalpha(square)
    rgba.save(tmp_path / "alpha.png")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "plain.png")
    square.convert("RGB").save(tmp_path / f"plain{ds.MASK_SUFFIX}")  # a colour mask file is read in grey levels
    Image.new("RGB", (64, 64)).save(tmp_path / "nomask.png")
    items = {i.path.name: i for i in ds.scan_dataset(tmp_path, "none", masked_loss=True)}
    assert sorted(items) == ["alpha.png", "nomask.png", "plain.png"]  # the mask file is not an image
    assert items["alpha.png"].mask == tmp_path / "alpha.png" and items["nomask.png"].mask is None
    expected_row = torch.tensor([0, 0.5, 1, 1, 1, 1, 0.5, 0])
    expected = (expected_row[:, None] * expected_row[None, :])[None, None]
    for name in ("alpha.png", "plain.png"):
        torch.testing.assert_close(latent_mask(items[name], (64, 64), (8, 8)), expected)
    assert latent_mask(items["nomask.png"], (64, 64), (8, 8)) is None
    # the pixels keep alpha flattened onto white, masked loss or not
    assert ds.load_image(tmp_path / "alpha.png").getpixel((0, 0)) == (255, 255, 255)


def test_the_mask_is_cached_at_latent_size_and_mirrors_with_the_image(tiny_model, tmp_path):
    left = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(left).rectangle((0, 0, 31, 63), fill=255)  # the left third
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (96, 64), (10, 200, 10)).save(data / "wide.png")
    left.save(data / f"wide{ds.MASK_SUFFIX}")
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    Image.new("RGB", (96, 64)).save(mirrored / "wide.png")
    left.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / f"wide{ds.MASK_SUFFIX}")

    settings = settings_for(data, tmp_path, masked_loss=True, flip_aug=True, bucketing=False)
    items = ds.scan_dataset(data, "none", masked_loss=True)
    samples = cache_latents(ldm_parts(tiny_model), items, [(64, 64)], {0}, settings, torch.device("cpu"),
                            nullcontext, lambda: False, 0)
    sample = samples[0]
    assert sample.mask.shape == (1, 1, *sample.latent.shape[-2:]) == sample.latent_flipped[:, :1].shape
    assert torch.equal(sample.loss_mask(False), sample.mask)
    # 96×64 cropped to its centre 64×64 (pixels 16–79): the mask covers pixels 16–31, latent columns 0 and 1
    assert sample.mask[0, 0, 0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    flipped_item = ds.scan_dataset(mirrored, "none", masked_loss=True)[0]
    assert torch.equal(sample.loss_mask(True), latent_mask(flipped_item, (64, 64), (8, 8)))
    plain = dataclasses.replace(sample, mask=None)
    assert torch.equal(plain.loss_mask(True), torch.ones(1, 1, 8, 8))


def test_the_loss_ignores_the_prediction_outside_the_mask(tmp_path):
    """A square subject's mask, through the real cache path: whatever the model predicts outside the square (and
    whatever the target is there) changes neither the loss nor the gradient inside, and gets no gradient."""
    write_dataset(tmp_path / "data", {0: square_mask(8, 40)}, count=1)
    item = ds.scan_dataset(tmp_path / "data", "txt", masked_loss=True)[0]
    mask = latent_mask(item, (64, 64), (8, 8))
    outside = (mask == 0).expand(2, 4, 8, 8)
    assert mask[0, 0, 1:5, 1:5].eq(1).all() and outside.sum() == 2 * 4 * (64 - 16)
    gen = torch.Generator().manual_seed(0)
    prediction, target, other_prediction, other_target = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(4))
    ac_all, timesteps = sd_schedule(), torch.tensor([100, 700])

    def loss_and_gradient(settings, prediction, target):
        prediction = prediction.clone().requires_grad_(True)
        loss = (loop.elementwise_loss(prediction, target, settings, timesteps, ac_all) * mask).mean()
        loss.backward()
        return loss.detach(), prediction.grad

    for loss_type in ("l2", "huber"):
        settings = dataclasses.replace(TrainSettings(), masked_loss=True, loss_type=loss_type)
        loss, gradient = loss_and_gradient(settings, prediction, target)
        moved = loss_and_gradient(settings, torch.where(outside, other_prediction, prediction),
                                  torch.where(outside, other_target, target))
        assert torch.equal(loss, moved[0]) and torch.equal(gradient, moved[1])
        assert gradient[outside].eq(0).all() and gradient[~outside].ne(0).all()


def test_a_mask_of_another_size_is_refused_naming_both_files(tiny_model, tmp_path):
    data = write_dataset(tmp_path / "data", {1: square_mask(0, 16, size=32)})
    (data / f"img_2{ds.MASK_SUFFIX}").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as refused:
        ds.scan_dataset(data, "txt", masked_loss=True)
    message = str(refused.value)
    assert "img_1.mask.png is 32x32 but img_1.png is 64x64" in message
    assert "img_2.mask.png does not open as an image" in message
    out = tmp_path / "out"
    with pytest.raises(LohatrainError, match="img_1.mask.png is 32x32 but img_1.png is 64x64"):
        train(ldm_parts(tiny_model), settings_for(data, out, masked_loss=True))
    assert not out.exists() or not list(out.iterdir())
    # without masked loss the masks are not read, and they are never training images
    assert [i.path.name for i in ds.scan_dataset(data, "txt")] == [f"img_{i}.png" for i in range(4)]


def test_masked_loss_without_any_mask_is_refused(tmp_path):
    data = write_dataset(tmp_path / "data")
    with pytest.raises(DatasetError, match="masked_loss is on but no image has a mask"):
        ds.scan_dataset(data, "txt", masked_loss=True)


def test_the_doctor_counts_masks_and_names_the_unusable_and_empty_ones(tmp_path):
    data = write_dataset(tmp_path / "data", {0: Image.new("L", (64, 64), 0), 1: square_mask(0, 8, size=48),
                                             2: square_mask(8, 56)})
    report = doctor.check(data, "txt", resolution=64, masked_loss=True)
    assert report.images == 4 and report.masks == 3
    kinds = {(p.file, p.kind) for p in report.problems if "mask" in p.kind}
    assert kinds == {("img_0.png", "empty_mask"), ("img_1.png", "mask_unusable")}
    assert "img_1.mask.png is 48x48 but img_1.png is 64x64" in next(p.message for p in report.problems
                                                                    if p.kind == "mask_unusable")
    plain = doctor.check(data, "txt", resolution=64)
    assert plain.masks == 3 and not [p for p in plain.problems if "mask" in p.kind]


def test_a_changed_mask_file_is_a_changed_dataset_for_resume(tmp_path):
    data = write_dataset(tmp_path / "data", {0: square_mask(8, 40)})
    before = dataset_fingerprint(ds.scan_dataset(data, "txt", masked_loss=True))
    square_mask(0, 64).save(data / f"img_0{ds.MASK_SUFFIX}")  # another mask, of another size on disk
    after = dataset_fingerprint(ds.scan_dataset(data, "txt", masked_loss=True))
    saved = SavedRun(tmp_path / "x", {}, {"run": {"model_id": "m", "dataset": before}})
    assert saved.changes("m", after) == ["images with another mask: img_0.png"]
    assert saved.changes("m", before) == []


def test_rest_refuses_a_mask_of_another_size_and_bad_loss_settings_and_the_doctor_sees_masks(webui_server):
    import httpx

    ui = webui_server
    data = write_dataset(ui.root / "masked-data", {0: square_mask(0, 16, size=32), 1: square_mask(8, 40)})
    body = {"name": "rest-masked", "dataset_dir": str(data), "caption_mode": "txt", "resolution": 64,
            "bucket_min_side": 64, "bucket_max_side": 128, "steps": 2, "batch_size": 2, "train_dtype": "fp32",
            "network_preset": "small", "overwrite": True, "masked_loss": True}
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=body)
    assert r.status_code == 422 and "img_0.mask.png is 32x32 but img_0.png is 64x64" in r.json()["detail"][0]
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json={**body, "loss_type": "cauchy", "ip_noise_gamma": -1})
    assert r.status_code == 422
    assert r.json()["detail"] == ["ip_noise_gamma must be at least 0 and at most 1, not -1",
                                  "loss_type must be one of l2, l1, huber, smooth_l1, not 'cauchy'"]
    r = httpx.post(f"{ui.url}/lohatrain/v1/dataset/check", json={"dataset_dir": str(data), "resolution": 64,
                                                                  "masked_loss": True})
    assert r.status_code == 200 and r.json()["masks"] == 2
    assert [(p["file"], p["kind"]) for p in r.json()["problems"] if "mask" in p["kind"]] == [
        ("img_0.png", "mask_unusable")]
    r = httpx.post(f"{ui.url}/lohatrain/v1/dataset/check", json={"dataset_dir": str(data), "masked_loss": 1})
    assert r.status_code == 422 and r.json()["detail"] == ["masked_loss must be true or false"]
