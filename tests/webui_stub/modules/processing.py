"""txt2img: `StableDiffusionProcessingTxt2Img` and `process_images(p) -> Processed`.

The host's flow, kept: `p.sd_model` is always `shared.sd_model` (the constructor argument is ignored);
process_images first calls `sd_models.reload_model_weights()` (so the model is switched back to
opts.sd_model_checkpoint if it differs), then per batch: Skip is cleared, Interrupt stops, `<lora:…>` tags are
stripped from the prompts and, unless `p.disable_extra_networks`, every extra network is activated (for Lora:
`networks.load_networks(...)`, with `[]` when the prompt names none); `state.job_count` -1 becomes n_iter,
`state.sampling_steps/sampling_step/current_latent` follow the steps, `state.nextjob()` after each batch.
Seeds: -1 is random; image i of the batch uses seed + i; the noise is drawn after `torch.manual_seed(seed)`,
which re-seeds torch's GLOBAL generator, as the host does. Interrupt or Skip during sampling returns the
last denoised estimate, which is still decoded and returned. With 2+ images and not do_not_save_grid,
images[0] is a grid.

Conditioning, as the host's setup_conds: the batch's prompts and negative prompts go to the model's
`get_learned_conditioning` as `prompt_parser.SdConditioning` lists carrying the generation's width/height (the
negative one flagged `is_negative_prompt`), so an SDXL model's "vector" holds the generation size and an empty
negative prompt is all zeros. Conditioning is whatever the model returns: a tensor (SD1) or SDXL's dict
{"crossattn", "vector"}; the sampler hands it to `apply_model` unchanged. Left out: prompt editing schedules,
the cond caches.

The stand-in's sampler: DDIM (eta 0, uniform timesteps) with classifier-free guidance, whatever
`sampler_name` says (a name the host does not have fails as there: "bad sampler name"); the conditional and unconditional predictions are two `apply_model` calls (the host
batches them). As the host's timestep samplers, each prediction is first turned into noise (a v-prediction
model's "v" by ε = √ᾱ·v + √(1−ᾱ)·x_t, `predict_eps`), guidance mixes the two noises, and the denoised
estimate is x0 = (x_t − √(1−ᾱ)·ε) / √ᾱ. Nothing is written to disk (the host saves samples unless do_not_save_samples).
Ports modules/processing.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from modules import devices, extra_networks, images, prompt_parser, sd_hijack, sd_models, sd_samplers, shared
from modules.shared import opts, state

opt_C = 4
opt_f = 8


def get_fixed_seed(seed):
    if seed == '' or seed is None:
        seed = -1
    elif isinstance(seed, str):
        try:
            seed = int(seed)
        except Exception:
            seed = -1
    if seed == -1:
        return int(random.randrange(4294967294))
    return seed


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None
    ddim_discretize: str = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False
    firstpass_image: Any = None
    comments: dict = None

    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)
    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)

    def __post_init__(self):
        self.comments = {}
        if self.styles is None:
            self.styles = []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.scripts = None
        self.script_args = []
        if not self.seed_enable_extras:
            self.subseed, self.subseed_strength, self.seed_resize_from_h, self.seed_resize_from_w = -1, 0, 0, 0

    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        elif isinstance(self.negative_prompt, list):
            self.all_prompts = [self.prompt] * len(self.negative_prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                        is_negative_prompt=True)
        model = self.sd_model
        self.uc = model.get_learned_conditioning(negative_prompts)
        self.c = model.get_learned_conditioning(prompts)


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ''
    hr_negative_prompt: str = ''
    force_task_id: str = None

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        # as the host's sd_samplers.create_sampler: an unknown name fails here, at the first image
        assert sd_samplers.find_sampler_config(self.sampler_name) is not None, f'bad sampler name: {self.sampler_name}'
        shape = (getattr(self.sd_model, "latent_channels", opt_C), self.height // opt_f, self.width // opt_f)
        noise = []
        for seed in seeds:
            torch.manual_seed(seed)  # as the host's rng.randn: the global generator
            noise.append(torch.randn(shape, device=devices.cpu))
        x = torch.stack(noise).to(devices.device)
        return _ddim(self.sd_model, x, conditioning, unconditional_conditioning, self.steps, self.cfg_scale)


def predict_eps(model, x, t, cond, alphas, v_pred):
    """The noise the model predicts in x (= x_t) at timesteps t, as the host's sampler wrappers
    (sd_samplers_timesteps: CompVisTimestepsDenoiser; CompVisTimestepsVDenoiser when parameterization is "v").

    With ᾱ = alphas[t], x_t = √ᾱ·x0 + √(1−ᾱ)·ε and v = √ᾱ·ε − √(1−ᾱ)·x0 (ldm's get_v), so
    ε = √ᾱ·v + √(1−ᾱ)·x_t and x0 = √ᾱ·x_t − √(1−ᾱ)·v (ldm's predict_eps_from_z_and_v / predict_start_from_z_and_v).
    """
    out = model.apply_model(x, t, cond)
    if not v_pred:
        return out
    a_t = alphas[t.to(torch.long)][:, None, None, None]
    return a_t.sqrt() * out + (1 - a_t).sqrt() * x


def _ddim(model, x, cond, uncond, steps, cfg_scale):
    alphas = model.alphas_cumprod.to(device=x.device, dtype=torch.float32)
    n = len(alphas)
    steps = max(1, min(int(steps), n))
    timesteps = [t + 1 for t in range(0, n, n // steps)][:steps]
    timesteps = [min(t, n - 1) for t in reversed(timesteps)]
    v_pred = getattr(model, "parameterization", "eps") == "v"

    state.sampling_steps = steps
    state.sampling_step = 0
    last_latent = x
    for i, t in enumerate(timesteps):
        if state.interrupted or state.skipped:
            return last_latent
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps_c = predict_eps(model, x, t_batch, cond, alphas, v_pred)
        eps_u = predict_eps(model, x, t_batch, uncond, alphas, v_pred)
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        a_t = alphas[t]
        a_prev = alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else alphas[0]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        last_latent = x0
        state.sampling_step = i  # the index of the step just done, as the host's sampler callback
        state.current_latent = x0
    return x


def decode_first_stage(model, x):
    return model.decode_first_stage(x.to(devices.dtype_vae))


def latent_to_image(latent, index=0):
    """A latent (batch) to a PIL image, as the host's sd_samplers.sample_to_image."""
    with torch.no_grad():
        x = decode_first_stage(shared.sd_model, latent[index:index + 1])[0]
    return _to_pil(x)


def _to_pil(x):
    x = torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return Image.fromarray((255. * np.moveaxis(x.cpu().numpy(), 0, 2)).astype(np.uint8))


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt if not isinstance(p.prompt, list) else p.prompt[0]
        self.negative_prompt = p.negative_prompt if not isinstance(p.negative_prompt, list) else p.negative_prompt[0]
        self.seed = int(seed if not isinstance(seed, list) else seed[0]) if seed is not None else -1
        self.subseed = subseed
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.width = p.width
        self.height = p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.job_timestamp = state.job_timestamp
        self.clip_skip = opts.CLIP_stop_at_last_layers
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)


def create_infotext(p, all_prompts, all_seeds, index=0):
    params = {
        "Steps": p.steps, "Sampler": p.sampler_name or "DDIM", "CFG scale": p.cfg_scale, "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}", "Model hash": p.sd_model_hash, "Model": p.sd_model_name,
        "Clip skip": None if opts.CLIP_stop_at_last_layers <= 1 else opts.CLIP_stop_at_last_layers,
        **p.extra_generation_params,
    }
    text = ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)
    negative = p.all_negative_prompts[index] if p.all_negative_prompts else ""
    return f"{all_prompts[index]}" + (f"\nNegative prompt: {negative}" if negative else "") + f"\n{text}"


def process_images(p: StableDiffusionProcessing) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings if k in opts.data}
    try:
        if sd_models.checkpoint_aliases.get(p.override_settings.get('sd_model_checkpoint')) is None:
            p.override_settings.pop('sd_model_checkpoint', None)
            sd_models.reload_model_weights()
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == 'sd_model_checkpoint':
                sd_models.reload_model_weights()
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    assert p.prompt is not None
    devices.torch_gc()
    seed = get_fixed_seed(p.seed)
    subseed = get_fixed_seed(p.subseed)

    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    sd_hijack.model_hijack.clear_comments()
    p.setup_prompts()
    p.all_seeds = [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts, output_images = [], []
    with torch.no_grad():
        if state.job_count == -1:
            state.job_count = p.n_iter

        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break

            sd_models.reload_model_weights()  # as the host: the model can have been changed meanwhile

            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds, p.subseeds = p.all_seeds[batch], p.all_subseeds[batch]
            if len(p.prompts) == 0:
                break

            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                               subseeds=p.subseeds)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)

            p.setup_conds()
            for comment in sd_hijack.model_hijack.comments:
                p.comment(comment)
            if p.n_iter > 1:
                state.job = f"Batch {n + 1} out of {p.n_iter}"

            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                               subseeds=p.subseeds, subseed_strength=p.subseed_strength, prompts=p.prompts)
            decoded = decode_first_stage(p.sd_model, samples)
            del samples
            state.nextjob()

            for i, x in enumerate(decoded):
                image = _to_pil(x)
                text = create_infotext(p, p.all_prompts[batch], p.seeds, i)
                infotexts.append(text)
                if opts.enable_pnginfo:
                    image.info["parameters"] = text
                output_images.append(image)

        if not infotexts:
            infotexts.append("")

        index_of_first_image = 0
        unwanted_grid = len(output_images) < 2 and opts.grid_only_if_multiple
        if (opts.return_grid or opts.grid_save) and not p.do_not_save_grid and not unwanted_grid and opts.return_grid:
            output_images.insert(0, images.image_grid(output_images, p.batch_size))
            infotexts.insert(0, infotexts[0])
            index_of_first_image = 1

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    devices.torch_gc()

    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0],
                    subseed=p.all_subseeds[0], index_of_first_image=index_of_first_image, infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
