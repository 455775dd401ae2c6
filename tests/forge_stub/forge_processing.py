"""Forge 2's txt2img, as an overlay on the WebUI stand-in's `modules.processing` (tests/webui_stub): Forge keeps
A1111's `StableDiffusionProcessingTxt2Img` and replaces what `process_images` does. Tests put `process_images` of
this module in place of the stand-in's (`monkeypatch.setattr(processing, "process_images", ...)`).

Written from Forge at commit dfdcbab685e57677014f05a3309b48cc87383167: modules/processing.py (process_images,
manage_model_and_prompt_cache, process_images_inner, get_conds_with_caching), modules/sd_samplers_kdiffusion.py
(KDiffusionSampler.sample), modules/sd_samplers_common.py (launch_sampling, callback_state),
modules/sd_samplers_cfg_denoiser.py (CFGDenoiser.forward) and k_diffusion/external.py (ForgeScheduleLinker). Kept:
- `sd_models.forge_model_reload()` before the generation and before each batch;
- everything from the first batch to the decoded images runs under `torch.inference_mode`;
- each batch starts from `forge_objects = forge_objects_original.shallow_copy()`; the extra networks are activated
  (unless `p.disable_extra_networks`: Forge's Lora extension then leaves `forge_objects_after_applying_lora`, the
  patchers of the last `<lora:…>` prompt, as they are), then `forge_objects = forge_objects_after_applying_lora
  .shallow_copy()`: the patchers the batch samples with;
- the text path: `set_clip_skip(opts.CLIP_stop_at_last_layers)`, then the engine's `get_learned_conditioning`;
- sampling: `sampling_prepare` (the memory manager loads `forge_objects.unet`, merging its LoRAs), the predictor's
  sigmas, the noise (`torch.manual_seed(seed)`, then `randn`) scaled by the first sigma, and each step's
  `forge_objects.unet` read anew by the denoiser, which raises on Interrupt or Skip: the last denoised estimate is
  returned, decoded and kept, as Forge does; `state.sampling_step` follows the steps;
- VAE decode through the engine's `decode_first_stage`.
The stand-in's sampler is Euler for every sampler name (an unknown name fails as in Forge), with Forge's default
schedule (`ForgeScheduleLinker.get_sigmas`). Left out: scripts, hires fix, refiner, tiling, the cond caches, seeds'
variation, zero-terminal-SNR, live previews, saving files and infotexts beyond the prompt.
"""
import torch

from backend.sampling.sampling_function import sampling_cleanup, sampling_function, sampling_prepare
from modules import extra_networks, prompt_parser, sd_models, sd_samplers, shared
from modules.processing import Processed, _to_pil, get_fixed_seed, opt_f
from modules.shared import opts, state


class InterruptedException(BaseException):
    """modules/sd_samplers_common.py: raised by the denoiser, caught by `launch_sampling`."""


def process_images(p):
    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings
                   if k in opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get('sd_model_checkpoint')) is None:
            p.override_settings.pop('sd_model_checkpoint', None)
        for k, v in p.override_settings.items():  # Forge's set_config(..., run_callbacks=False)
            opts.set(k, v, is_api=True, run_callbacks=False)
        sd_models.forge_model_reload()  # manage_model_and_prompt_cache
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)


def process_images_inner(p):
    seed, subseed = get_fixed_seed(p.seed), get_fixed_seed(p.subseed)
    model = shared.sd_model
    p.sd_model_name = model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = model.sd_model_hash
    p.setup_prompts()
    p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]
    output_images = []
    with torch.inference_mode():
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            sd_models.forge_model_reload()
            model.forge_objects = model.forge_objects_original.shallow_copy()
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds, p.subseeds = p.all_seeds[batch], p.all_subseeds[batch]
            if len(p.prompts) == 0:
                break
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            model.forge_objects = model.forge_objects_after_applying_lora.shallow_copy()
            model.set_clip_skip(int(opts.CLIP_stop_at_last_layers))  # get_conds_with_caching
            p.setup_conds()
            samples = sample(p, model, p.c, p.uc)
            decoded = model.decode_first_stage(samples)
            state.nextjob()
            output_images += [_to_pil(x) for x in decoded]
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    return Processed(p, images_list=output_images, seed=p.all_seeds[0], subseed=p.all_subseeds[0])


def get_sigmas(predictor, steps):
    """ForgeScheduleLinker.get_sigmas(n): n sigmas from the largest down, interpolated, then 0."""
    t = torch.linspace(len(predictor.sigmas) - 1, 0, steps, device=predictor.sigmas.device)
    return torch.cat([predictor.sigma(t), predictor.sigmas.new_zeros([1])])


def sample(p, model, cond, uncond):
    """KDiffusionSampler.sample with Euler, and the CFG denoiser reading `forge_objects.unet` at each step."""
    assert sd_samplers.find_sampler_config(p.sampler_name) is not None, f'bad sampler name: {p.sampler_name}'
    shape = (model.forge_objects.vae.latent_channels, p.height // opt_f, p.width // opt_f)
    noise = []
    for seed in p.seeds:
        torch.manual_seed(seed)
        noise.append(torch.randn(shape))
    x = torch.stack(noise)
    unet_patcher = model.forge_objects.unet
    sampling_prepare(unet_patcher, x)
    sigmas = get_sigmas(model.forge_objects.unet.model.predictor, p.steps).to(x.device)
    x = x * sigmas[0]  # Prediction.noise_scaling without sgm_noise_multiplier
    last_latent = x
    state.sampling_steps, state.sampling_step = p.steps, 0
    try:
        for i in range(len(sigmas) - 1):
            if state.interrupted or state.skipped:  # CFGDenoiser.forward
                raise InterruptedException
            sigma = sigmas[i] * x.new_ones([x.shape[0]])
            denoised = sampling_function(model.forge_objects.unet, x, sigma, uncond, cond, p.cfg_scale)
            last_latent = denoised
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            state.sampling_step = i
    except InterruptedException:
        x = last_latent
    sampling_cleanup(unet_patcher)
    return x
