"""ldm_patched/modules/lora.py: ComfyUI's LoRA key rules and weight merging, as reForge loads files. The UNet's rules,
`load_lora` and the merging formulas are the same ComfyUI code Forge 2 vendors (packages_3rdparty/
comfyui_lora_collection, backend/patcher/lora.py), so the Forge stand-in's are used (tests/forge_stub); the text
encoder's are here: for each `clip_l`/`clip_h` transformers layer of the CLIP's state dict,
`lora_te_text_model_encoder_layers_N_<LORA_CLIP_MAP name>` (and `lora_te1_…`, `text_encoder.…`).

Ports ldm_patched/modules/lora.py of Panchovix/stable-diffusion-webui-reForge `main` at commit 3b56b268.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "forge_stub"))

from backend.loader import unet_config  # noqa: E402
from backend.patcher.lora import merge_lora_to_weight  # noqa: E402
from packages_3rdparty.comfyui_lora_collection.lora import load_lora, unet_to_diffusers  # noqa: E402, F401

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}


def calculate_weight(patches, weight, key):
    return merge_lora_to_weight(patches, weight, key)


def model_lora_keys_unet(model, key_map=None):
    key_map = {} if key_map is None else key_map
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
    for diffusers, ldm in unet_to_diffusers(unet_config(model.diffusion_model)).items():
        key_map["lora_unet_" + diffusers.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
        key_map["lycoris_" + diffusers.replace(".", "_")] = f"diffusion_model.{ldm}.weight"
    return key_map


def model_lora_keys_clip(model, key_map=None):
    key_map = {} if key_map is None else key_map
    keys = set(model.state_dict())
    for b in range(32):
        for c, name in LORA_CLIP_MAP.items():
            for clip in ("clip_h", "clip_l"):
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{c}.weight"
                if k in keys:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{name}"] = k
                    key_map[f"lora_te1_text_model_encoder_layers_{b}_{name}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{c}"] = k
    return key_map
