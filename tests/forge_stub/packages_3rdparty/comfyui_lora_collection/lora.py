"""The ComfyUI-derived LoRA key rules Forge 2 loads files with (packages_3rdparty/comfyui_lora_collection/lora.py
and utils.py), for the UNet.

`model_lora_keys_unet(kmodel)`: for every `diffusion_model.<path>.weight` of the KModel's state dict,
`lora_unet_<path with dots as underscores>` and the bare `diffusion_model.<path>`; then the diffusers names of
`unet_to_diffusers(diffusion_model.config)` (which follows the UNet's actual layout: res blocks per level, transformer
depths), as `lora_unet_<diffusers path>` and `lycoris_<diffusers path>`. `load_lora(file, key_map)` turns each mapped
layer's tensors into a patch: ("lora", (up, down, alpha, mid, dora_scale)), ("loha", (w1a, w1b, alpha, w2a, w2b,
t1, t2, dora_scale)) or ("lokr", (w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora_scale)), and returns the tensors
that matched nothing. `model_lora_keys_clip(cond_stage_model)`: SD1's CLIP layers as
`lora_te_text_model_encoder_layers_<n>_<layer>` (the stand-in's text encoder is ldm's, without Forge's `clip_l.`
prefix; SD2's and SDXL's text keys are left out). GLoRA, diff and BFL control formats are left out.
Ports packages_3rdparty/comfyui_lora_collection/lora.py and utils.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
_ATTENTION = ("proj_in", "proj_out", "norm")
_TRANSFORMER = ("norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_RESNET = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
           "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_BASIC = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
          "time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
          "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def unet_to_diffusers(config) -> dict[str, str]:
    """diffusers module path → ldm module path (ComfyUI's map, without the .weight/.bias suffixes)."""
    res_blocks = config["num_res_blocks"]
    depth, depth_out = list(config["transformer_depth"]), list(config["transformer_depth_output"])
    out = {}

    def attention(diffusers, ldm, transformers):
        for b in _ATTENTION:
            out[f"{diffusers}.{b}"] = f"{ldm}.{b}"
        for t in range(transformers):
            for b in _TRANSFORMER:
                out[f"{diffusers}.transformer_blocks.{t}.{b}"] = f"{ldm}.transformer_blocks.{t}.{b}"

    for x in range(len(config["channel_mult"])):
        n = 1 + (res_blocks[x] + 1) * x
        for i in range(res_blocks[x]):
            for b, d in _RESNET.items():
                out[f"down_blocks.{x}.resnets.{i}.{d}"] = f"input_blocks.{n}.0.{b}"
            transformers = depth.pop(0)
            if transformers > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
    attention("mid_block.attentions.0", "middle_block.1", config["transformer_depth_middle"])
    for i, n in enumerate((0, 2)):
        for b, d in _RESNET.items():
            out[f"mid_block.resnets.{i}.{d}"] = f"middle_block.{n}.{b}"
    for x, blocks in enumerate(reversed(res_blocks)):
        n = (blocks + 1) * x
        for i in range(blocks + 1):
            c = 1
            for b, d in _RESNET.items():
                out[f"up_blocks.{x}.resnets.{i}.{d}"] = f"output_blocks.{n}.0.{b}"
            transformers = depth_out.pop()
            if transformers > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == blocks:
                out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{n}.{c}.conv"
            n += 1
    out.update({d: ldm for ldm, d in _BASIC.items()})
    return out


def model_lora_keys_unet(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            path = k[len("diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{path.replace('.', '_')}"] = k
            key_map[k[:-len(".weight")]] = k
    for diffusers, ldm in unet_to_diffusers(model.diffusion_model.config).items():
        target = f"diffusion_model.{ldm}.weight"
        key_map[f"lora_unet_{diffusers.replace('.', '_')}"] = target
        key_map[f"lycoris_{diffusers.replace('.', '_')}"] = target
    return key_map


LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def model_lora_keys_clip(model, key_map=None):
    key_map = {} if key_map is None else key_map
    sdk = model.state_dict().keys()
    for b in range(32):
        for c, lora_name in LORA_CLIP_MAP.items():
            k = f"transformer.text_model.encoder.layers.{b}.{c}.weight"
            if k in sdk:
                key_map[f"lora_te_text_model_encoder_layers_{b}_{lora_name}"] = k
    return key_map


def load_lora(lora, to_load):
    patches, loaded = {}, set()

    def take(name):
        if name in lora:
            loaded.add(name)
            return lora[name]
        return None

    for x, target in to_load.items():
        alpha = take(f"{x}.alpha")
        alpha = alpha.item() if alpha is not None else None
        dora_scale = take(f"{x}.dora_scale")
        if f"{x}.lora_up.weight" in lora:
            patches[target] = ("lora", (take(f"{x}.lora_up.weight"), take(f"{x}.lora_down.weight"), alpha,
                                        take(f"{x}.lora_mid.weight"), dora_scale))
        elif f"{x}.hada_w1_a" in lora:
            patches[target] = ("loha", (take(f"{x}.hada_w1_a"), take(f"{x}.hada_w1_b"), alpha, take(f"{x}.hada_w2_a"),
                                        take(f"{x}.hada_w2_b"), take(f"{x}.hada_t1"), take(f"{x}.hada_t2"), dora_scale))
        elif any(f"{x}.{n}" in lora for n in ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w2_a")):
            patches[target] = ("lokr", (take(f"{x}.lokr_w1"), take(f"{x}.lokr_w2"), alpha, take(f"{x}.lokr_w1_a"),
                                        take(f"{x}.lokr_w1_b"), take(f"{x}.lokr_w2_a"), take(f"{x}.lokr_w2_b"),
                                        take(f"{x}.lokr_t2"), dora_scale))
    return patches, {k: v for k, v in lora.items() if k not in loaded}
