"""The model a checkpoint file holds, built from its config: a `<name>.yaml` beside the file (as the WebUI's
`find_checkpoint_config_near_filename`), else the built-in config of the family its keys tell.

Configs are in the WebUI's formats: ldm's `LatentDiffusion` (v1-inference.yaml, v2-inference(-v).yaml) for
SD 1.x and 2.x, sgm's `DiffusionEngine` (sd_xl_base.yaml) for SDXL; the built-in ones below say the same as
those files. Two parts cannot be built as those configs name them, so they are built as lohatrain's offline
equivalents, with the same module names and so the same checkpoint keys:
- the text encoders: ldm's and sgm's download their weights and tokenizer (`from_pretrained`, open_clip's
  pretrained tags); lohatrain's (lohatrain.text_encoders, and their SDXL variants in lohatrain.sgm_standin)
  take the tokenizer from files the packages ship, and their sizes from the checkpoint's own weights (heads 64
  wide, as in every CLIP and OpenCLIP text model);
- SDXL: sgm is not on the registries, so lohatrain.sgm_standin (held against sgm by
  tools/check_sgm_standin.py) is built from the sgm config's sizes.
A config may also name lohatrain's text encoders directly (with explicit sizes), which is how tests describe
their tiny models. A config makes lohatrain import nothing but the classes in `_IMPORTABLE`, and no other file is
read for it (`ckpt_path`): a YAML that came with a downloaded model must not run code.
"""
from __future__ import annotations

import contextlib
import copy
import io

from torch import nn

from . import ldm_importable  # noqa: F401  (first: makes ldm importable)
from .errors import LohatrainError
from .sgm_standin import (SIZE_KEYS, ConcatTimestepEmbedderND, GeneralConditioner, OpenCLIPEmbedder2,
                          SDXLCLIPEmbedder, SDXLEngine, SDXLUNet)
from .text_encoders import CLIPEmbedder, OpenCLIPEmbedder
from ldm.models.autoencoder import AutoencoderKL  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
HEAD_WIDTH = 64


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# What a config may make lohatrain import; sgm's names (and ldm's text encoders) are read, never imported.
_IMPORTABLE = {LATENT_DIFFUSION, "ldm.modules.diffusionmodules.openaimodel.UNetModel",
               "ldm.models.autoencoder.AutoencoderKL", "torch.nn.Identity",
               *map(_path, (CLIPEmbedder, OpenCLIPEmbedder, SDXLCLIPEmbedder, OpenCLIPEmbedder2,
                            ConcatTimestepEmbedderND))}

# SD's VAE (every family's: SDXL's differs only in its weights).
_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _ldm(unet: dict, text_target: str, text_params: dict | None = None, parameterization: str = "eps") -> dict:
    """v1-inference.yaml's `model`, with what SD 2.x changes given."""
    return {"target": LATENT_DIFFUSION, "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "timesteps": 1000,
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 64, "channels": 4,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "scale_factor": 0.18215, "use_ema": False,
        "parameterization": parameterization,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
            "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
            "use_spatial_transformer": True, "transformer_depth": 1, "legacy": False, **unet}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "ddconfig": _VAE, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": text_target, "params": text_params or {}}}}


_LDM, _SGM = "ldm.modules.encoders.modules.", "sgm.modules.encoders.modules."
BUILT_IN = {
    "sd1": _ldm({"num_heads": 8, "context_dim": 768}, _LDM + "FrozenCLIPEmbedder"),
    "sd2": _ldm({"num_head_channels": 64, "use_linear_in_transformer": True, "context_dim": 1024},
                _LDM + "FrozenOpenCLIPEmbedder", {"freeze": True, "layer": "penultimate"}),
    "sdxl": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "adm_in_channels": 2816, "num_classes": "sequential", "in_channels": 4, "out_channels": 4,
            "model_channels": 320, "attention_resolutions": [4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 4],
            "num_head_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [1, 2, 10],
            "context_dim": 2048}},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": [
            {"input_key": "txt", "target": _SGM + "FrozenCLIPEmbedder", "params": {"layer": "hidden", "layer_idx": 11}},
            {"input_key": "txt", "target": _SGM + "FrozenOpenCLIPEmbedder2",
             "params": {"layer": "penultimate", "freeze": True, "always_return_pooled": True, "legacy": False}},
            *({"input_key": key, "target": _SGM + "ConcatTimestepEmbedderND", "params": {"outdim": 256}}
              for key in SIZE_KEYS)]}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "ddconfig": _VAE, "lossconfig": {"target": "torch.nn.Identity"}}}}},
}


def read_yaml(path) -> dict:
    """A config file as a plain dict (its `model` part), checked before anything in it is used."""
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:  # OmegaConf and yaml raise many types for a file that is not a config
        raise LohatrainError(f"{path.name} (the config beside the checkpoint) cannot be read: "
                             f"{' '.join(str(e).split())}") from None
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("target"), str):
        raise LohatrainError(f"{path.name} (the config beside the checkpoint) has no model: target: … to build")
    return model


def build(config: dict, weights: dict) -> nn.Module:
    """The model `config` describes (text encoders sized from `weights`), on whatever device and with whatever
    parameters the caller's construction context gives (lohatrain.checkpoint: parameters on the meta device)."""
    kind = config["target"].rsplit(".", 1)[-1]
    with contextlib.redirect_stdout(io.StringIO()):  # ldm prints a line per block it makes
        if kind == "DiffusionEngine":
            return _build_sdxl(copy.deepcopy(config["params"]), weights)
        if config["target"] == LATENT_DIFFUSION:
            return _build_ldm(copy.deepcopy(config), weights)
    raise LohatrainError(f"the config's model is a {config['target']}, which lohatrain does not train "
                         "(a LatentDiffusion or an SDXL DiffusionEngine)")


def _instantiate(config: dict):
    """ldm's instantiate_from_config, once every class the config names is one lohatrain builds and no other
    file would be read."""
    _vet(config)
    return instantiate_from_config(OmegaConf.create(config))


def _vet(node) -> None:
    if isinstance(node, dict):
        target = node.get("target")
        if target is not None and target not in _IMPORTABLE:
            raise LohatrainError(f"the config names {target!r}, which lohatrain does not build")
        if node.get("ckpt_path"):
            raise LohatrainError("the config names another file to load (ckpt_path), which lohatrain does not read")
        for value in node.values():
            _vet(value)
    elif isinstance(node, list):
        for value in node:
            _vet(value)


def _build_ldm(config: dict, weights: dict) -> nn.Module:
    params = config["params"]
    params["use_ema"] = False  # the EMA copy is not trained; the WebUI also builds without it unless told
    params.pop("scheduler_config", None)  # ldm's own training schedule, not used here
    # Precision is the run's (the weights' dtype and autocast), as the WebUI's repair_config overrides it too.
    params["unet_config"].setdefault("params", {})["use_fp16"] = False
    params["cond_stage_config"] = _ldm_text_encoder(params["cond_stage_config"], weights)
    return _instantiate(config)


def _ldm_text_encoder(stage: dict, weights: dict) -> dict:
    """ldm's downloading text encoders → lohatrain's offline ones, sized from the checkpoint."""
    target, params = stage["target"], stage.get("params") or {}
    if target == _LDM + "FrozenCLIPEmbedder":
        sizes = clip_sizes(weights, "cond_stage_model.transformer.text_model.")
        return {"target": _path(CLIPEmbedder), "params": {
            **sizes, "layer": params.get("layer", "last"), "layer_idx": params.get("layer_idx")}}
    if target == _LDM + "FrozenOpenCLIPEmbedder":
        sizes = openclip_sizes(weights, "cond_stage_model.model.")
        return {"target": _path(OpenCLIPEmbedder), "params": {
            **sizes, "freeze": True, "layer": params.get("layer", "last")}}
    if target.startswith("lohatrain."):
        return stage
    raise LohatrainError(f"the config's text encoder {target} is not one lohatrain builds "
                         "(ldm's FrozenCLIPEmbedder for SD 1.x, FrozenOpenCLIPEmbedder for SD 2.x)")


def _build_sdxl(params: dict, weights: dict) -> nn.Module:
    net = params["network_config"]["params"]
    levels = len(net["channel_mult"])
    depth = net.get("transformer_depth", 1)
    context_dim = net["context_dim"]
    if isinstance(context_dim, list) or "num_head_channels" not in net or net.get("num_classes") != "sequential":
        raise LohatrainError("the config's UNet is not SDXL base's kind (one context width, 64-wide heads, "
                             "a vector conditioning)")
    unet = SDXLUNet(model_channels=net["model_channels"], channel_mult=tuple(net["channel_mult"]),
                    transformer_depth=tuple(depth if isinstance(depth, list) else [depth] * levels),
                    context_dim=context_dim, adm_in_channels=net["adm_in_channels"],
                    num_head_channels=net["num_head_channels"], num_res_blocks=net.get("num_res_blocks", 2),
                    attention_levels=tuple(i for i in range(levels) if 2 ** i in net["attention_resolutions"]),
                    in_channels=net.get("in_channels", 4), out_channels=net.get("out_channels", 4))
    entries = params["conditioner_config"]["params"]["emb_models"]
    embedders = [_sdxl_embedder(entry, weights, f"conditioner.embedders.{i}.") for i, entry in enumerate(entries)]
    vae_params = params["first_stage_config"]["params"]
    ddconfig = {k: v for k, v in vae_params["ddconfig"].items() if k != "attn_type"}  # ldm picks its own
    vae = AutoencoderKL(ddconfig, {"target": "torch.nn.Identity"}, embed_dim=vae_params["embed_dim"])
    model = SDXLEngine(unet, GeneralConditioner(embedders), vae, scale_factor=params.get("scale_factor", 0.13025))
    scaling = (params.get("denoiser_config") or {}).get("params", {}).get("scaling_config", {}).get("target", "")
    model.parameterization = "v" if scaling.endswith("VScaling") else "eps"  # as the WebUI's extend_sdxl
    return model


def _sdxl_embedder(entry: dict, weights: dict, prefix: str) -> nn.Module:
    """One of sgm's conditioner embedders, with the attributes sgm's GeneralConditioner gives it."""
    target, params = entry["target"], entry.get("params") or {}
    kind = target.rsplit(".", 1)[-1]
    if target.startswith("lohatrain."):
        embedder = _instantiate({"target": target, "params": params})
    elif kind == "FrozenCLIPEmbedder":
        embedder = SDXLCLIPEmbedder(**clip_sizes(weights, prefix + "transformer.text_model."),
                                    layer=params.get("layer", "last"), layer_idx=params.get("layer_idx"))
    elif kind == "FrozenOpenCLIPEmbedder2":
        if not params.get("always_return_pooled", False) or params.get("legacy", True):
            raise LohatrainError("the config's OpenCLIP embedder is not SDXL base's (pooled output, not legacy)")
        embedder = OpenCLIPEmbedder2(**openclip_sizes(weights, prefix + "model."),
                                     layer=params.get("layer", "penultimate"))
    elif kind == "ConcatTimestepEmbedderND":
        embedder = ConcatTimestepEmbedderND(params["outdim"], entry["input_key"])
    else:
        raise LohatrainError(f"the config's conditioner embedder {target} is not one of SDXL base's")
    embedder.is_trainable = entry.get("is_trainable", False)
    embedder.input_key = entry["input_key"]
    embedder.ucg_rate = entry.get("ucg_rate", 0.0)
    return embedder


class OtherSizes(LohatrainError):
    """The checkpoint's model is not of the sizes its config (the built-in one) describes."""


def clip_sizes(weights: dict, prefix: str) -> dict:
    """A transformers CLIP text model's sizes, read off its weights."""
    width = _shape(weights, prefix + "embeddings.token_embedding.weight")[1]
    return {"hidden_size": width, "num_layers": _count(weights, prefix + "encoder.layers."),
            "num_heads": _heads(width),
            "intermediate_size": _shape(weights, prefix + "encoder.layers.0.mlp.fc1.weight")[0],
            "max_length": _shape(weights, prefix + "embeddings.position_embedding.weight")[0]}


def openclip_sizes(weights: dict, prefix: str) -> dict:
    """An open_clip text model's sizes, read off its weights."""
    width = _shape(weights, prefix + "token_embedding.weight")[1]
    return {"width": width, "layers": _count(weights, prefix + "transformer.resblocks."),
            "heads": _heads(width), "max_length": _shape(weights, prefix + "positional_embedding")[0]}


def _heads(width: int) -> int:
    if width % HEAD_WIDTH:
        raise OtherSizes(f"its text encoder is {width} wide, not a whole number of {HEAD_WIDTH}-wide heads")
    return width // HEAD_WIDTH


def _shape(weights: dict, key: str) -> tuple[int, ...]:
    if key not in weights:
        raise LohatrainError(f"the checkpoint has no {key}: its text encoder is missing or in another layout")
    return tuple(weights[key].shape)


def _count(weights: dict, prefix: str) -> int:
    return len({key[len(prefix):].split(".", 1)[0] for key in weights if key.startswith(prefix)})

