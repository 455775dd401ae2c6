"""`modules.sd_samplers`: the host's sampler list, by name (v1.10.1 modules/sd_samplers.py and the names of
sd_samplers_kdiffusion / sd_samplers_timesteps / sd_samplers_lcm). `set_samplers()` runs at start-up
(initialize_rest); `visible_sampler_names()` leaves out Settings → `hide_samplers`.

Difference: only names and aliases; the stand-in's txt2img samples with one DDIM sampler whatever the name.
Ports modules/sd_samplers.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
from collections import namedtuple

from modules import shared

SamplerData = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])

_NAMES = [("DPM++ 2M", ["k_dpmpp_2m"]), ("DPM++ SDE", ["k_dpmpp_sde"]), ("DPM++ 2M SDE", ["k_dpmpp_2m_sde"]),
          ("DPM++ 2M SDE Heun", ["k_dpmpp_2m_sde_heun"]), ("DPM++ 2S a", ["k_dpmpp_2s_a"]),
          ("DPM++ 3M SDE", ["k_dpmpp_3m_sde"]), ("Euler a", ["k_euler_a", "k_euler_ancestral"]),
          ("Euler", ["k_euler"]), ("LMS", ["k_lms"]), ("Heun", ["k_heun"]), ("DPM2", ["k_dpm_2"]),
          ("DPM2 a", ["k_dpm_2_a"]), ("DPM fast", ["k_dpm_fast"]), ("DPM adaptive", ["k_dpm_ad"]),
          ("Restart", ["restart"]), ("DDIM", ["ddim"]), ("DDIM CFG++", ["ddim_cfgpp"]), ("PLMS", ["plms"]),
          ("UniPC", ["unipc"]), ("LCM", ["k_lcm"])]
all_samplers = [SamplerData(name, None, aliases, {}) for name, aliases in _NAMES]
all_samplers_map = {x.name: x for x in all_samplers}

samplers = []
samplers_map = {}
samplers_hidden = set()


def find_sampler_config(name):
    return all_samplers_map.get(name, None) if name is not None else all_samplers[0]


def set_samplers():
    global samplers, samplers_hidden
    samplers_hidden = set(shared.opts.hide_samplers)
    samplers = all_samplers
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]


set_samplers()
