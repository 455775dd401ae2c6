"""Checkpoints: the list, their names and hashes, and loading one into `shared.sd_model`.

Stand-in for building a model from a checkpoint's config: `model_factory(checkpoint_info)` (tests may replace
it; default, by the file name in any case: a tiny SDXL, `lohatrain.demo_sdxl.build_tiny_sdxl`, when it contains
"xl"; else a tiny SD2 768-v (v-prediction), `lohatrain.demo.build_tiny_sd2`, when it contains "sd2" or "v2";
else a tiny SD1, `lohatrain.demo.build_tiny_sd1`; the seed comes from the checkpoint's name). The config the
host would find for the file (`find_checkpoint_config`: sd_xl_base.yaml, v2-inference-v.yaml or
v1-inference.yaml) follows the same name rule. Then, as the host, the file's state dict is loaded into it
(strict=False); a file that is not a safetensors/torch state dict (e.g. a few placeholder bytes) loads nothing
and the factory's weights stay. Models stay float32 on the CPU (the host halves them unless --no-half).

As the host:
- A `CheckpointInfo`'s sha256/shorthash come from the hash cache only (None for a file never hashed, so its
  title is just the name); loading a checkpoint hashes it and changes its title to "name [shorthash]".
- `reload_model_weights()` returns at once, without callbacks, when the model already holds that file
  (unless forced_reload). A state dict that fits the current model is loaded INTO THE SAME model object
  (the host's same-config path; it then returns None); otherwise a new model is built, the old one is sent to
  the "meta" device (unusable afterwards), and the new one is returned. Both paths call model_loaded callbacks
  and write opts.data["sd_model_checkpoint"] = title. A checkpoint of another config (SD1 / SD2 / SDXL) always
  gets a new model.
- Loading sets the model type (`is_sd1/is_sd2/is_sdxl/is_ssd/is_sd3`, `model_type`; SD2 is a model without a
  conditioner whose bare `cond_stage_model` has a `.model`, i.e. ldm's FrozenOpenCLIPEmbedder; its
  `parameterization` is the config's, "v" for the 768-v models); for SDXL it runs
  sd_models_xl.extend_sdxl (fields, and the get_learned_conditioning / apply_model / get_first_stage_encoding
  methods) and sets `is_sdxl_inpaint`. The host takes an SDXL state dict without the middle block's first
  attention for SSD-1B; the stand-in only looks when the file holds a state dict (a placeholder stands for
  the factory's complete model), and leaves out the SSD conversion itself.
Ports modules/sd_models.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import collections
import enum
import os
import re
import sys
import zlib

import safetensors.torch
import torch

from modules import devices, errors, hashes, paths, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
os.makedirs(model_path, exist_ok=True)

checkpoints_list = {}
checkpoint_aliases = {}


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def _family_of_file(checkpoint_info):
    """The family the stand-in builds for a file: "sdxl", "sd2" or "sd1", by its name ("xl" is looked for first)."""
    name = os.path.basename(checkpoint_info.filename).lower()
    if "xl" in name:
        return "sdxl"
    if "sd2" in name or "v2" in name:
        return "sd2"
    return "sd1"


_CONFIGS = {"sdxl": "sd_xl_base.yaml", "sd2": "v2-inference-v.yaml", "sd1": "v1-inference.yaml"}


def find_checkpoint_config(state_dict, info):
    """The name of the config the stand-in builds for this checkpoint (see the module docstring)."""
    return _CONFIGS[_family_of_file(info)]


def _default_model_factory(checkpoint_info):
    seed = zlib.crc32(checkpoint_info.name_for_extra.encode("utf-8")) % 1000
    family = _family_of_file(checkpoint_info)
    if family == "sdxl":
        from lohatrain.demo_sdxl import build_tiny_sdxl
        return build_tiny_sdxl(seed)
    if family == "sd2":
        from lohatrain.demo import build_tiny_sd2
        return build_tiny_sd2(seed)
    from lohatrain.demo import build_tiny_sd1
    return build_tiny_sd1(seed)


model_factory = _default_model_factory


def model_hash(filename):
    """The host's old 8-hex hash of 64 KiB at offset 1 MiB."""
    import hashlib
    try:
        with open(filename, "rb") as file:
            file.seek(0x100000)
            return hashlib.sha256(file.read(0x10000)).hexdigest()[0:8]
    except FileNotFoundError:
        return 'NOFILE'


class CheckpointInfo:
    def __init__(self, filename, sha256=None):
        """`sha256` (stand-in only): as if the host's hash cache already held this file's hash."""
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath.replace(ckpt_dir, '')
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, '')
        else:
            name = os.path.basename(filename)
        if name.startswith(("\\", "/")):
            name = name[1:]

        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading metadata for {filename}")
        self.modelspec_thumbnail = self.metadata.pop('modelspec.thumbnail', None)

        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)

        if sha256 is not None and os.path.exists(filename):
            hashes.cache["hashes"][f"checkpoint/{name}"] = {"mtime": os.path.getmtime(filename), "sha256": sha256}
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None

        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'

        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f'{name} [{self.hash}]']
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']

    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None
        shorthash = self.sha256[0:10]
        if self.shorthash == shorthash:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']
        old_title = self.title
        self.title = f'{self.name} [{self.shorthash}]'
        self.short_title = f'{self.name_for_extra} [{self.shorthash}]'
        # keep the list's order, with the new title in the old one's place
        items = [(self.title, self) if k == old_title else (k, v) for k, v in checkpoints_list.items()]
        if old_title not in checkpoints_list:
            items.append((self.title, self))
        checkpoints_list.clear()
        checkpoints_list.update(items)
        self.register()
        return self.shorthash


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():
    """Re-reads the checkpoint folders (cmd_opts.ckpt_dir first, then models/Stable-diffusion, recursively):
    .ckpt and .safetensors, not .vae.*; --ckpt (if the file exists) also becomes the selected checkpoint."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    places = []
    if shared.cmd_opts.ckpt_dir is not None and shared.cmd_opts.ckpt_dir != model_path and os.path.exists(shared.cmd_opts.ckpt_dir):
        places.append(shared.cmd_opts.ckpt_dir)
    places.append(model_path)
    found = []
    for place in places:
        for path in shared.walk_files(place, allowed_extensions=[".ckpt", ".safetensors"]):
            if path.endswith((".vae.ckpt", ".vae.safetensors")) or path in found:
                continue
            found.append(path)

    cmd_ckpt = shared.cmd_opts.ckpt
    if cmd_ckpt and os.path.exists(cmd_ckpt):
        info = CheckpointInfo(cmd_ckpt)
        info.register()
        shared.opts.data['sd_model_checkpoint'] = info.title
    for filename in found:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    for s in (search_string, re.sub(re_strip_checksum, '', search_string)):
        found = sorted((i for i in checkpoints_list.values() if s in i.title), key=lambda x: len(x.title))
        if found:
            return found[0]
    return None


def select_checkpoint():
    """The checkpoint named by opts.sd_model_checkpoint, else the first in the list (FileNotFoundError if none)."""
    wanted = shared.opts.sd_model_checkpoint
    info = checkpoint_aliases.get(wanted)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError(f"No checkpoints found. When searching for checkpoints, looked at:\n - directory {model_path}"
                                + (f"\n - directory {shared.cmd_opts.ckpt_dir}" if shared.cmd_opts.ckpt_dir else "")
                                + "Can't run without a checkpoint.")
    info = next(iter(checkpoints_list.values()))
    if wanted is not None:
        print(f"Checkpoint {wanted} not found; loading fallback {info.title}", file=sys.stderr)
    return info


def read_metadata_from_safetensors(filename):
    import json
    with open(filename, mode="rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
        start = file.read(2)
        assert header_len > 2 and start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res = {}
        try:
            header = json.loads(start + file.read(header_len - 2))
            for k, v in header.get("__metadata__", {}).items():
                res[k] = v
                if isinstance(v, str) and v[0:1] == '{':
                    try:
                        res[k] = json.loads(v)
                    except Exception:
                        pass
        except Exception:
            errors.report(f"Error reading metadata from file: {filename}", exc_info=True)
        return res


_SD1_TEXT_KEYS = {
    'cond_stage_model.transformer.embeddings.': 'cond_stage_model.transformer.text_model.embeddings.',
    'cond_stage_model.transformer.encoder.': 'cond_stage_model.transformer.text_model.encoder.',
    'cond_stage_model.transformer.final_layer_norm.': 'cond_stage_model.transformer.text_model.final_layer_norm.',
}


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    sd = {}
    for k, v in pl_sd.items():
        for old, new in _SD1_TEXT_KEYS.items():
            if k.startswith(old):
                k = new + k[len(old):]
        sd[k] = v
    return sd


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return get_state_dict_from_checkpoint(pl_sd)


def get_checkpoint_state_dict(checkpoint_info, timer=None):
    sd_model_hash = checkpoint_info.calculate_shorthash()
    print(f"Loading weights [{sd_model_hash}] from {checkpoint_info.filename}")
    try:
        return read_state_dict(checkpoint_info.filename)
    except Exception:  # stand-in only: a placeholder file
        return {}


class SkipWritingToConfig:
    """Inside it, loading weights does not write the checkpoint's title to opts.sd_model_checkpoint."""
    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def set_model_type(model, state_dict):
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3 = True
        model.model_type = ModelType.SD3
    elif hasattr(model, 'conditioner'):
        model.is_sdxl = True
        first_attention = 'model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight'
        if state_dict and first_attention not in state_dict:
            model.is_ssd = True
            model.model_type = ModelType.SSD
        else:
            model.model_type = ModelType.SDXL
    elif hasattr(model.cond_stage_model, 'model'):
        model.is_sd2 = True
        model.model_type = ModelType.SD2
    else:
        model.is_sd1 = True
        model.model_type = ModelType.SD1


def set_model_fields(model):
    if not hasattr(model, 'latent_channels'):
        model.latent_channels = 4


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    sd_model_hash = checkpoint_info.calculate_shorthash()
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    set_model_type(model, state_dict)
    set_model_fields(model)
    if model.is_sdxl:
        from modules import sd_models_xl
        sd_models_xl.extend_sdxl(model)
    if state_dict:
        model.load_state_dict(state_dict, strict=False)
    diffusion_model_input = model.model.state_dict().get('diffusion_model.input_blocks.0.0.weight')
    model.is_sdxl_inpaint = model.is_sdxl and diffusion_model_input is not None and diffusion_model_input.shape[1] == 9
    model.alphas_cumprod_original = model.alphas_cumprod
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            try:
                load_model()
            except Exception as e:
                errors.display(e, "loading stable diffusion model", full_traceback=True)
                print("Stable diffusion model failed to load", file=sys.stderr)
                self.sd_model = None
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if v in self.loaded_sd_models:
            self.loaded_sd_models.remove(v)
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def send_model_to_trash(m):
    m.to(device="meta")
    devices.torch_gc()


def get_empty_cond(sd_model):
    """As the host: activating extra networks with none in the prompt (the Lora extension then calls
    networks.load_networks([])), then the conditioning of the empty prompt (SDXL: its "crossattn")."""
    networks = sys.modules.get("networks")
    if networks is not None:
        networks.load_networks([])
    d = sd_model.get_learned_conditioning([""])
    if isinstance(d, dict):
        d = d['crossattn']
    return d


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    from modules import sd_hijack
    checkpoint_info = checkpoint_info or select_checkpoint()
    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None
    state_dict = already_loaded_state_dict if already_loaded_state_dict is not None else get_checkpoint_state_dict(checkpoint_info)
    sd_model = model_factory(checkpoint_info)
    sd_model.used_config = find_checkpoint_config(state_dict, checkpoint_info)
    load_model_weights(sd_model, checkpoint_info, state_dict)
    sd_model.to(devices.device)
    sd_hijack.model_hijack.hijack(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    with torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    print(f"Model loaded: {checkpoint_info.title}")
    return sd_model


def _fits(sd_model, state_dict):
    from modules import sd_hijack
    if not state_dict:
        return False
    sd_hijack.model_hijack.undo_hijack(sd_model)
    try:
        own = sd_model.state_dict()
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
    return all(k in own and own[k].shape == v.shape for k, v in state_dict.items())


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    from modules import sd_hijack
    checkpoint_info = info or select_checkpoint()
    if not sd_model:
        sd_model = model_data.sd_model

    if sd_model is None:
        current_checkpoint_info = None
    else:
        current_checkpoint_info = sd_model.sd_checkpoint_info
        if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            return sd_model

    state_dict = get_checkpoint_state_dict(checkpoint_info)
    checkpoint_config = find_checkpoint_config(state_dict, checkpoint_info)
    if sd_model is None or checkpoint_config != sd_model.used_config or not _fits(sd_model, state_dict):
        if sd_model is not None:
            send_model_to_trash(sd_model)
            model_data.sd_model = None
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model

    sd_hijack.model_hijack.undo_hijack(sd_model)
    try:
        load_model_weights(sd_model, checkpoint_info, state_dict)
    except Exception:
        print("Failed to load checkpoint, restoring previous")
        load_model_weights(sd_model, current_checkpoint_info, None)
        raise
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        sd_model.to(devices.device)
        script_callbacks.model_loaded_callback(sd_model)
    print(f"Weights loaded: {checkpoint_info.title}")
    model_data.set_sd_model(sd_model)
    # the host's function ends here without a return: None on this path
