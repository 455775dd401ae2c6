"""The built-in Lora extension's `networks` module (extensions-builtin/Lora), for LoRA/LoCon, LoHa and LoKr files
(DoRA included) on SD1, SD2 and SDXL. Ported from the host at v1.10.1 (30c19445): networks.py, network.py
(NetworkModule: calc_scale, finalize_updown, apply_weight_decompose), network_lora.py, network_hada.py,
network_lokr.py and lyco_helpers.py.

How the host applies networks, kept: `load_networks(names, ...)` only decides WHICH networks are loaded
(`loaded_networks`); the weights change later, lazily, when a layer runs. The host patches the forward of every
Linear / Conv2d / GroupNorm / LayerNorm / MultiheadAttention to call `network_apply_weights(self)` first: if
the layer's `network_current_names` differ from the wanted set (name, te mult, unet mult, dyn) it restores the
layer from `network_weights_backup` / `network_bias_backup` (taken the first time a network is wanted) and
adds each loaded network's ΔW in place. Loading a state dict into a layer drops its backup and names.
The stand-in does the same per model instead of globally: `assign_network_names_to_compvis_modules` (a
model_loaded callback, as in the host) gives each layer of the loaded model a forward pre-hook and a
load_state_dict pre-hook. A layer whose `forward` was replaced on the instance is skipped, as the host's
class-level patch is then never reached.

Consequences an adapter must respect (host and stand-in alike):
- `load_networks([])` alone takes nothing off the weights until each layer runs again.
- Restoring from the backup is an in-place copy outside `no_grad`: on a parameter with requires_grad=True and
  grad mode on it raises "a leaf Variable that requires grad is being used in an in-place operation".
- The wanted set does not include the file: a network re-written under the same name and loaded with the same
  multipliers is re-read (newer mtime) but layers that already carry the old one are not re-applied.

Layer names (`network_layer_mapping`), as the host: the text encoder's modules (`cond_stage_model.wrapped`,
e.g. SD1's `transformer_text_model_encoder_layers_0_self_attn_q_proj`, SD2's OpenCLIP
`model_transformer_resblocks_0_attn`) and `model.model`'s (`diffusion_model_…`), dots as underscores. SDXL (`is_sdxl`): instead of the text encoder, each conditioner embedder that has a
`.wrapped` (the hijacked text encoders), prefixed by its index: `0_transformer_text_model_…` (CLIP-L),
`1_model_transformer_resblocks_N_…` (bigG).
Key matching follows the host's load_network, written from its source here: `convert_diffusers_name_to_compvis`
(diffusers UNet names → ldm for SD1's layout, conv_in / conv_out / time_embedding, `lora_te_` → SD1's
CLIP or, when the map has `model_transformer_resblocks` (SD2), OpenCLIP's names, `lora_te2_` → `1_model_
transformer_resblocks_N_` with self_attn → attn, mlp_fc1/fc2 → mlp_c_fc/c_proj), then the `_[qkv]_proj` retry on
the rest of the name (a fused attention), then the `lora_unet` → `diffusion_model` fallback (SDXL's ldm-named
UNet keys) or the `lora_te1_text_model` → `0_transformer_text_model` (then `transformer_text_model`) fallback.
A fused `nn.MultiheadAttention` (SD2's and bigG's) changes only when the network has all four of its
`<name>_q_proj`, `_k_proj`, `_v_proj`, `_out_proj`: q/k/v add into the thirds of `in_proj_weight`, out into
`out_proj.weight`; a partial set is silently ignored, and the `out_proj` Linear never applies anything on its
own (its forward never runs). ΔW as the host computes it: LoRA up·down (a conv's down in the layer's kernel, up
1x1; lora_A/lora_B renamed), LoHa (w1a·w1b) ⊙ (w2a·w2b) (Tucker with hada_t1/t2), LoKr w1 ⊗ w2 (each whole or
a·b; lokr_t2 Tucker), then · alpha/dim (or `scale`; 1 when the type has no dim), then with `dora_scale`
the host's weight decomposition (W + ΔW normalised per input channel, times dora_scale, minus W), then · the
te multiplier for a layer whose name has "transformer" in its first 20 characters, else the unet one, in the
file's dtype. Module types are tried in the host's order (LoRA, LoHa, LoKr).
Left out: IA3, full, norm, GLoRA, OFT, LoRA's lora_mid (CP), dyn_dim, bundled embeddings, the diffusers weight
map (SD3) and `lora_functional`. Unmatched keys are logged at DEBUG (as the
host) and kept in `last_unmatched_keys`.
"""
from __future__ import annotations

import enum
import logging
import os
import re
from collections import namedtuple

import torch

from modules import devices, errors, extra_networks, hashes, script_callbacks, sd_hijack, sd_models, shared


NetworkWeights = namedtuple('NetworkWeights', ['network_key', 'sd_key', 'w', 'sd_module'])
metadata_tags_order = {"ss_sd_model_name": 1, "ss_resolution": 2, "ss_clip_skip": 3, "ss_num_train_images": 10, "ss_tag_frequency": 20}


class SdVersion(enum.Enum):
    Unknown = 1
    SD1 = 2
    SD2 = 3
    SDXL = 4


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if self.is_safetensors:
            try:
                self.metadata = sd_models.read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading lora {filename}")
        if self.metadata:
            self.metadata = dict(sorted(self.metadata.items(), key=lambda x: metadata_tags_order.get(x[0], 999)))
        self.alias = self.metadata.get('ss_output_name', self.name)
        self.hash = None
        self.shorthash = None
        self.set_hash(self.metadata.get('sshs_model_hash')
                      or hashes.sha256_from_cache(self.filename, "lora/" + self.name, use_addnet_hash=self.is_safetensors)
                      or '')
        self.sd_version = self.detect_version()

    def detect_version(self):
        if str(self.metadata.get('ss_base_model_version', "")).startswith("sdxl_"):
            return SdVersion.SDXL
        if str(self.metadata.get('ss_v2', "")) == "True":
            return SdVersion.SD2
        return SdVersion.SD1 if self.metadata else SdVersion.Unknown

    def set_hash(self, v):
        self.hash = v
        self.shorthash = self.hash[0:12]
        if self.shorthash:
            available_network_hash_lookup[self.shorthash] = self

    def read_hash(self):
        if not self.hash:
            self.set_hash(hashes.sha256(self.filename, "lora/" + self.name, use_addnet_hash=self.is_safetensors) or '')


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


def make_weight_cp(t, wa, wb):
    temp = torch.einsum('i j k l, j r -> i r k l', t, wb)
    return torch.einsum('i j k l, i r -> r j k l', temp, wa)


def rebuild_conventional(up, down, shape):
    up = up.reshape(up.size(0), -1)
    down = down.reshape(down.size(0), -1)
    return (up @ down).reshape(shape)


class NetworkModule:
    """network.NetworkModule: what every type shares (scale, multiplier, finalize_updown with DoRA)."""

    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if hasattr(self.sd_module, 'weight'):
            self.shape = self.sd_module.weight.shape
        elif isinstance(self.sd_module, torch.nn.MultiheadAttention):
            self.shape = self.sd_module.out_proj.weight.shape
        else:
            self.shape = None
        self.dim = None
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        self.dora_scale = weights.w.get("dora_scale", None)
        self.dora_norm_dims = len(self.shape) - 1

    def multiplier(self):
        return self.network.te_multiplier if 'transformer' in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown, orig_weight):
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        updown = updown.to(orig_weight.device)
        merged_scale1 = updown + orig_weight
        merged_scale1_norm = (
            merged_scale1.transpose(0, 1)
            .reshape(merged_scale1.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged_scale1.shape[1], *[1] * self.dora_norm_dims)
            .transpose(0, 1)
        )
        dora_merged = merged_scale1 * (dora_scale / merged_scale1_norm)
        return dora_merged - orig_weight

    def finalize_updown(self, updown, orig_weight, output_shape):
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown * self.multiplier(), None


class NetworkModuleLora(NetworkModule):
    """network_lora.NetworkModuleLora (its create_module's reshapes; no lora_mid)."""

    def __init__(self, net, weights):
        super().__init__(net, weights)
        is_linear = type(self.sd_module) in (torch.nn.Linear, torch.nn.modules.linear.NonDynamicallyQuantizableLinear,
                                             torch.nn.MultiheadAttention)
        up, down = weights.w["lora_up.weight"], weights.w["lora_down.weight"]
        if is_linear:
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        elif isinstance(self.sd_module, torch.nn.Conv2d):
            if len(down.shape) == 2:
                down = down.reshape(down.shape[0], -1, 1, 1)
            up = up.reshape(up.shape[0], up.shape[1], 1, 1)
        else:
            raise AssertionError(f'Lora layer {self.network_key} matched a layer with unsupported type: '
                                 f'{type(self.sd_module).__name__}')
        self.up, self.down = up, down
        self.dim = down.shape[0]

    def calc_updown(self, orig_weight):
        up, down = self.up.to(orig_weight.device), self.down.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if len(down.shape) == 4:
            output_shape += down.shape[2:]
        return self.finalize_updown(rebuild_conventional(up, down, output_shape), orig_weight, output_shape)


class NetworkModuleHada(NetworkModule):
    """network_hada.NetworkModuleHada."""

    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w1a, self.w1b = weights.w["hada_w1_a"], weights.w["hada_w1_b"]
        self.w2a, self.w2b = weights.w["hada_w2_a"], weights.w["hada_w2_b"]
        self.dim = self.w1b.shape[0]
        self.t1, self.t2 = weights.w.get("hada_t1"), weights.w.get("hada_t2")

    def calc_updown(self, orig_weight):
        w1a, w1b, w2a, w2b = (w.to(orig_weight.device) for w in (self.w1a, self.w1b, self.w2a, self.w2b))
        output_shape = [w1a.size(0), w1b.size(1)]
        if self.t1 is not None:
            output_shape = [w1a.size(1), w1b.size(1)]
            t1 = self.t1.to(orig_weight.device)
            updown1 = make_weight_cp(t1, w1a, w1b)
            output_shape += t1.shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = rebuild_conventional(w1a, w1b, output_shape)
        if self.t2 is not None:
            updown2 = make_weight_cp(self.t2.to(orig_weight.device), w2a, w2b)
        else:
            updown2 = rebuild_conventional(w2a, w2b, output_shape)
        return self.finalize_updown(updown1 * updown2, orig_weight, output_shape)


def make_kron(orig_shape, w1, w2):
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    w2 = w2.contiguous()
    return torch.kron(w1, w2).reshape(orig_shape)


class NetworkModuleLokr(NetworkModule):
    """network_lokr.NetworkModuleLokr."""

    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w1 = weights.w.get("lokr_w1")
        self.w1a = weights.w.get("lokr_w1_a")
        self.w1b = weights.w.get("lokr_w1_b")
        self.dim = self.w1b.shape[0] if self.w1b is not None else self.dim
        self.w2 = weights.w.get("lokr_w2")
        self.w2a = weights.w.get("lokr_w2_a")
        self.w2b = weights.w.get("lokr_w2_b")
        self.dim = self.w2b.shape[0] if self.w2b is not None else self.dim
        self.t2 = weights.w.get("lokr_t2")

    def calc_updown(self, orig_weight):
        device = orig_weight.device
        w1 = self.w1.to(device) if self.w1 is not None else self.w1a.to(device) @ self.w1b.to(device)
        if self.w2 is not None:
            w2 = self.w2.to(device)
        elif self.t2 is None:
            w2 = self.w2a.to(device) @ self.w2b.to(device)
        else:
            w2 = make_weight_cp(self.t2.to(device), self.w2a.to(device), self.w2b.to(device))
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(orig_weight.shape) == 4:
            output_shape = orig_weight.shape
        return self.finalize_updown(make_kron(output_shape, w1, w2), orig_weight, output_shape)


def module_for(net, weights):
    """The host's module types in its order (networks.module_types), the three the stand-in knows."""
    w = weights.w
    if all(x in w for x in ("lora_up.weight", "lora_down.weight")):
        return NetworkModuleLora(net, weights)
    if all(x in w for x in ("lora_A.weight", "lora_B.weight")):
        w.update({"lora_up.weight": w.pop("lora_B.weight"), "lora_down.weight": w.pop("lora_A.weight")})
        return NetworkModuleLora(net, weights)
    if all(x in w for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")):
        return NetworkModuleHada(net, weights)
    has_1 = "lokr_w1" in w or ("lokr_w1_a" in w and "lokr_w1_b" in w)
    has_2 = "lokr_w2" in w or ("lokr_w2_a" in w and "lokr_w2_b" in w)
    if has_1 and has_2:
        return NetworkModuleLokr(net, weights)
    return None


suffix_conversion = {
    "attentions": {},
    "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"},
}


def convert_diffusers_name_to_compvis(key, is_sd2):
    def match(regex):
        r = re.match(regex, key)
        return [int(x) if x.isdigit() else x for x in r.groups()] if r else None

    if m := match(r"lora_unet_conv_in(.*)"):
        return f'diffusion_model_input_blocks_0_0{m[0]}'
    if m := match(r"lora_unet_conv_out(.*)"):
        return f'diffusion_model_out_2{m[0]}'
    if m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)"):
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"):
        suffix = suffix_conversion.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv"):
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv"):
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)"):
        if is_sd2:
            return f"model_transformer_resblocks_{m[0]}_{_openclip_suffix(m[1])}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)"):
        return f"1_model_transformer_resblocks_{m[0]}_{_openclip_suffix(m[1])}"
    return key


def _openclip_suffix(rest):
    if 'mlp_fc1' in rest:
        return rest.replace('mlp_fc1', 'mlp_c_fc')
    if 'mlp_fc2' in rest:
        return rest.replace('mlp_fc2', 'mlp_c_proj')
    return rest.replace('self_attn', 'attn')


re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")
_LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention)


def _forward_pre_hook(module, args):
    if "forward" in module.__dict__:
        return None  # an instance forward shadows the host's class-level patch
    network_apply_weights(module)
    return None


def _load_state_dict_pre_hook(module, *args, **kwargs):
    network_reset_cached_weight(module)


def _install_hooks(model):
    for module in model.modules():
        if isinstance(module, _LAYER_TYPES) and not getattr(module, "_stub_network_hooks", False):
            module.register_forward_pre_hook(_forward_pre_hook)
            module._register_load_state_dict_pre_hook(_load_state_dict_pre_hook, with_module=True)
            module._stub_network_hooks = True


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    model = shared.sd_model
    if model.is_sdxl:
        for i, embedder in enumerate(model.conditioner.embedders):
            if not hasattr(embedder, 'wrapped'):
                continue
            for name, module in embedder.wrapped.named_modules():
                network_name = f'{i}_{name.replace(".", "_")}'
                mapping[network_name] = module
                module.network_layer_name = network_name
    else:
        stage = getattr(model.cond_stage_model, 'wrapped', model.cond_stage_model)
        for name, module in stage.named_modules():
            mapping[name.replace(".", "_")] = module
            module.network_layer_name = name.replace(".", "_")
    for name, module in model.model.named_modules():
        mapping[name.replace(".", "_")] = module
        module.network_layer_name = name.replace(".", "_")
    sd_model.network_layer_mapping = mapping
    _install_hooks(model)


def load_network(name, network_on_disk):
    global last_unmatched_keys
    net = Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = sd_models.read_state_dict(network_on_disk.filename)
    if not hasattr(shared.sd_model, 'network_layer_mapping'):
        assign_network_names_to_compvis_modules(shared.sd_model)
    mapping = shared.sd_model.network_layer_mapping
    is_sd2 = 'model_transformer_resblocks' in mapping

    failed, matched = {}, {}
    for key_network, weight in sd.items():
        layer, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(layer, is_sd2)
        module = mapping.get(key)
        if module is None and (m := re_x_proj.match(key)):
            module = mapping.get(m.group(1))
        if module is None and "lora_unet" in layer:
            key = layer.replace("lora_unet", "diffusion_model")
            module = mapping.get(key)
        elif module is None and "lora_te1_text_model" in layer:
            key = layer.replace("lora_te1_text_model", "0_transformer_text_model")
            module = mapping.get(key)
            if module is None:
                key = layer.replace("lora_te1_text_model", "transformer_text_model")
                module = mapping.get(key)
        if module is None:
            failed[key_network] = key
            continue
        if key not in matched:
            matched[key] = NetworkWeights(network_key=key_network, sd_key=key, w={}, sd_module=module)
        matched[key].w[part] = weight

    for key, weights in matched.items():
        module = module_for(net, weights)
        if module is None:
            raise AssertionError(f"Could not find a module type (or module type is not implemented) that would "
                                 f"accept those keys: {', '.join(weights.w)}")
        net.modules[key] = module

    last_unmatched_keys = list(failed)
    if failed:
        logging.debug(f"Network {network_on_disk.filename} didn't match keys: {failed}")
    return net


def purge_networks_from_memory():
    while len(networks_in_memory) > shared.opts.lora_in_memory_limit and len(networks_in_memory) > 0:
        networks_in_memory.pop(next(iter(networks_in_memory)), None)
    devices.torch_gc()


def _lookup(name):
    if name.lower() in forbidden_network_aliases:
        return available_networks.get(name)
    return available_network_aliases.get(name)


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    already_loaded = {net.name: net for net in loaded_networks if net.name in names}
    loaded_networks.clear()

    unavailable = [n for n in names if (n.lower() in forbidden_network_aliases and available_networks.get(n) is None)
                   or available_network_aliases.get(n) is None]
    if unavailable:
        update_available_networks_by_names(unavailable)
    on_disk = [_lookup(n) for n in names]
    if any(x is None for x in on_disk):
        list_available_networks()
        on_disk = [_lookup(n) for n in names]

    failed = []
    for i, (network_on_disk, name) in enumerate(zip(on_disk, names)):
        net = already_loaded.get(name)
        if network_on_disk is not None:
            if net is None:
                net = networks_in_memory.get(name)
            if net is None or os.path.getmtime(network_on_disk.filename) > net.mtime:
                try:
                    net = load_network(name, network_on_disk)
                    networks_in_memory.pop(name, None)
                    networks_in_memory[name] = net
                except Exception as e:
                    errors.display(e, f"loading network {network_on_disk.filename}")
                    continue
            net.mentioned_name = name
            network_on_disk.read_hash()
        if net is None:
            failed.append(name)
            logging.info(f"Couldn't find network with name {name}")
            continue
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else 1.0
        loaded_networks.append(net)

    if failed:
        message = f'Lora not found: {", ".join(failed)}'
        sd_hijack.model_hijack.comments.append(message)
        if shared.opts.lora_not_found_warning_console:
            print(f'\n{message}\n')
    purge_networks_from_memory()


def allowed_layer_without_weight(layer):
    return isinstance(layer, torch.nn.LayerNorm) and not layer.elementwise_affine


def store_weights_backup(weight):
    return None if weight is None else weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)  # not under no_grad, as the host


def network_restore_weights_from_backup(self):
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, 'in_proj_weight', weights_backup[0])
            restore_weights_backup(self.out_proj, 'weight', weights_backup[1])
        else:
            restore_weights_backup(self, 'weight', weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, 'bias', bias_backup)
    else:
        restore_weights_backup(self, 'bias', bias_backup)


def network_apply_weights(self):
    layer_name = getattr(self, 'network_layer_name', None)
    if layer_name is None:
        return
    current = getattr(self, "network_current_names", ())
    wanted = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)

    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted != ():
        if current != () and not allowed_layer_without_weight(self):
            raise RuntimeError(f"{layer_name} - no backup weights found and current weights are not unchanged")
        if isinstance(self, torch.nn.MultiheadAttention):
            weights_backup = (store_weights_backup(self.in_proj_weight), store_weights_backup(self.out_proj.weight))
        else:
            weights_backup = store_weights_backup(self.weight)
        self.network_weights_backup = weights_backup

    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted != ():
        if isinstance(self, torch.nn.MultiheadAttention) and self.out_proj.bias is not None:
            bias_backup = store_weights_backup(self.out_proj.bias)
        elif getattr(self, 'bias', None) is not None:
            bias_backup = store_weights_backup(self.bias)
        else:
            bias_backup = None
        if bias_backup is not None and current != ():
            raise RuntimeError("no backup bias found and current bias are not unchanged")
        self.network_bias_backup = bias_backup

    if current != wanted:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            module = net.modules.get(layer_name)
            if module is not None and hasattr(self, 'weight'):
                try:
                    with torch.no_grad():
                        updown, ex_bias = module.calc_updown(self.weight)
                        self.weight.copy_((self.weight.to(dtype=updown.dtype) + updown).to(dtype=self.weight.dtype))
                except RuntimeError as e:
                    logging.debug(f"Network {net.name} layer {layer_name}: {e}")
                    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
                continue

            module_q = net.modules.get(layer_name + "_q_proj")
            module_k = net.modules.get(layer_name + "_k_proj")
            module_v = net.modules.get(layer_name + "_v_proj")
            module_out = net.modules.get(layer_name + "_out_proj")
            if isinstance(self, torch.nn.MultiheadAttention) and module_q and module_k and module_v and module_out:
                try:
                    with torch.no_grad():
                        qw, kw, vw = self.in_proj_weight.chunk(3, 0)
                        updown_qkv = torch.vstack([module_q.calc_updown(qw)[0], module_k.calc_updown(kw)[0],
                                                   module_v.calc_updown(vw)[0]])
                        updown_out, ex_bias = module_out.calc_updown(self.out_proj.weight)
                        self.in_proj_weight += updown_qkv
                        self.out_proj.weight += updown_out
                except RuntimeError as e:
                    logging.debug(f"Network {net.name} layer {layer_name}: {e}")
                    extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
                continue

            if module is None:
                continue
            logging.debug(f"Network {net.name} layer {layer_name}: couldn't find supported operation")
            extra_network_lora.errors[net.name] = extra_network_lora.errors.get(net.name, 0) + 1
        self.network_current_names = wanted


def network_reset_cached_weight(self):
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def process_network_files(names=None):
    candidates = list(shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    candidates += list(shared.walk_files(shared.cmd_opts.lyco_dir_backcompat, allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    for filename in candidates:
        if os.path.isdir(filename):
            continue
        name = os.path.splitext(os.path.basename(filename))[0]  # the file name only, also in sub-folders
        if names and name not in names:
            continue
        try:
            entry = NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def update_available_networks_by_names(names):
    process_network_files(names)


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()


class ExtraNetworkLora(extra_networks.ExtraNetwork):
    """`<lora:name:te_mult:unet_mult:dyn>` or `<lora:name:te=…:unet=…>`; unet defaults to te, te to 1."""

    remove_symbols = str.maketrans('', '', ":,")

    def __init__(self):
        super().__init__('lora')
        self.errors = {}

    def activate(self, p, params_list):
        additional = shared.opts.sd_lora
        self.errors.clear()
        if additional != "None" and additional in available_networks and not any(x for x in params_list if x.items[0] == additional):
            p.all_prompts = [x + f"<lora:{additional}:{shared.opts.extra_networks_default_multiplier}>" for x in p.all_prompts]
            params_list.append(extra_networks.ExtraNetworkParams(items=[additional, shared.opts.extra_networks_default_multiplier]))
        names, te_multipliers, unet_multipliers, dyn_dims = [], [], [], []
        for params in params_list:
            assert params.items
            names.append(params.positional[0])
            te = float(params.positional[1]) if len(params.positional) > 1 else 1.0
            te = float(params.named.get("te", te))
            unet = float(params.positional[2]) if len(params.positional) > 2 else te
            unet = float(params.named.get("unet", unet))
            dyn = int(params.positional[3]) if len(params.positional) > 3 else None
            dyn = int(params.named["dyn"]) if "dyn" in params.named else dyn
            te_multipliers.append(te)
            unet_multipliers.append(unet)
            dyn_dims.append(dyn)
        load_networks(names, te_multipliers, unet_multipliers, dyn_dims)
        if shared.opts.lora_add_hashes_to_infotext:
            p.lora_hashes = {}
            for item in loaded_networks:
                if item.network_on_disk.shorthash and item.mentioned_name:
                    p.lora_hashes[item.mentioned_name.translate(self.remove_symbols)] = item.network_on_disk.shorthash
            if p.lora_hashes:
                p.extra_generation_params["Lora hashes"] = ', '.join(f'{k}: {v}' for k, v in p.lora_hashes.items())

    def deactivate(self, p):
        if self.errors:
            p.comment("Networks with errors: " + ", ".join(f"{k} ({v})" for k, v in self.errors.items()))
            self.errors.clear()


available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}
last_unmatched_keys = []

extra_network_lora = ExtraNetworkLora()
extra_networks.register_extra_network(extra_network_lora)
extra_networks.register_extra_network_alias(extra_network_lora, "lyco")
script_callbacks.on_model_loaded(assign_network_names_to_compvis_modules)

list_available_networks()
