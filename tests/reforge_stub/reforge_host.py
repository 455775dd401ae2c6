"""reForge `main`'s side of a loaded model's life (Panchovix/stable-diffusion-webui-reForge at 3b56b26), for the tiny
ldm models of lohatrain.demo: loading (modules_forge/forge_loader.py `load_model_for_a1111`), its text wrappers
(modules_forge/forge_clip.py), its Lora extension (extensions-builtin/Lora/networks.py `load_networks`,
ldm_patched/modules/sd.py `load_lora_for_models`) and a txt2img
pass (modules/processing.py `process_images_inner` with modules_forge/forge_sampler.py `sampling_prepare`).

What a run meets there, reproduced: A1111's LatentDiffusion whose `model.diffusion_model` is the UNet the patcher
holds (`forge_objects.unet.model.diffusion_model`); a LoRA merged into the UNet's and the text encoder's weights by
loading patched clones (the text encoder's when a prompt is encoded: forge_clip loads `forge_objects.clip.patcher`)
and left merged after the generation; `forge_objects_after_applying_lora`, which txt2img samples even with extra
networks off; a txt2img pass under `torch.inference_mode`, whose loads and moves make the weights inference tensors;
a VAE and a text encoder that load themselves through the memory manager (and so may unload the UNet);
`encode_first_stage` under inference mode with `get_first_stage_encoding` the identity; on SD 2.x ldm's
`FrozenOpenCLIPEmbedder` with a placeholder `model` and a transformers `CLIPTextModel` as `transformer` (penultimate
layer, CLIP skip applied from 3), and `is_sd2` False (reForge looks for a `model` on the wrapper). Left out: SDXL,
samplers, emphasis and prompt chunking, textual inversion, separate text encoders, half precision.
"""
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_patched.modules import model_management
from ldm_patched.modules.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from ldm_patched.modules.model_patcher import ModelPatcher


class opts:  # modules.shared.opts, the one option read here
    CLIP_stop_at_last_layers = 1


class BaseModel(nn.Module):
    """ldm_patched.modules.model_base.BaseModel: the UNet patcher's model."""

    def __init__(self, diffusion_model, scale_factor):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.scale_factor = scale_factor  # model_config.latent_format: process_in / process_out


class Holder(nn.Module):
    """What a VAE's or CLIP's patcher holds (ldm_patched's own modules; ldm's Lightning modules refuse `device`)."""

    def __init__(self, **parts):
        super().__init__()
        for name, part in parts.items():
            setattr(self, name, part)


class ForgeSD:
    def __init__(self, unet, clip, vae):
        self.unet, self.clip, self.vae = unet, clip, vae

    def shallow_copy(self):
        return ForgeSD(self.unet, self.clip, self.vae)


class Part:
    """ldm_patched's CLIP / VAE (ldm_patched/modules/sd.py): a model and its patcher; a clone shares the model and
    clones the patcher, and the CLIP's `add_patches` are its patcher's."""

    def __init__(self, model):
        self.model = model
        self.patcher = ModelPatcher(model, model_management.gpu, model_management.cpu)

    @property
    def cond_stage_model(self):
        return self.model

    def clone(self):
        n = Part.__new__(Part)
        n.model, n.patcher = self.model, self.patcher.clone()
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)


class FakeObject:
    """forge_loader's placeholder for the open_clip model it does not build."""

    visual = None

    def eval(self):
        return self

    def parameters(self):
        return []


class FrozenOpenCLIPEmbedder(nn.Module):
    """ldm's SD 2.x embedder as forge_loader leaves it: `model` a placeholder, `transformer` the checkpoint's clip_h."""

    def __init__(self, transformer, tokenizer):
        super().__init__()
        self.model = FakeObject()
        self.transformer, self.tokenizer = transformer, tokenizer
        self.layer, self.layer_idx = "penultimate", 1


def move_clip_to_gpu(sd_model):
    model_management.load_model_gpu(sd_model.forge_objects.clip.patcher)


class _ClipWrapper(nn.Module):
    """A1111's FrozenCLIPEmbedderWithCustomWords as forge_clip subclasses it, without emphasis or chunking."""

    def __init__(self, wrapped, sd_model):
        super().__init__()
        self.wrapped = wrapped
        self._sd_model = [sd_model]  # not a submodule

    def forward(self, texts):
        tokens = self.wrapped.tokenizer(texts, truncation=True, max_length=77, padding="max_length",
                                        return_tensors="pt")["input_ids"]
        move_clip_to_gpu(self._sd_model[0])
        return self.encode_with_transformers(tokens)


class CLIP_SD_15_L(_ClipWrapper):
    def encode_with_transformers(self, tokens):
        skip = opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        if skip > 1:
            return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[-skip])
        return outputs.last_hidden_state


class CLIP_SD_21_H(_ClipWrapper):
    def __init__(self, wrapped, sd_model):
        super().__init__(wrapped, sd_model)
        if self.wrapped.layer == "penultimate":
            self.wrapped.layer, self.wrapped.layer_idx = "hidden", -2

    def encode_with_transformers(self, tokens):
        skip = opts.CLIP_stop_at_last_layers
        outputs = self.wrapped.transformer(tokens, output_hidden_states=True)
        layer = -skip if skip > 2 else self.wrapped.layer_idx
        return self.wrapped.transformer.text_model.final_layer_norm(outputs.hidden_states[layer])


def _sd2_clip_h(seed):
    """A tiny transformers CLIP the width of the tiny SD2's context (the checkpoint's clip_h, converted)."""
    from lohatrain.demo import SD2_TEXT_WIDTH
    from lohatrain.text_encoders import CLIP_VOCAB_SIZE

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=SD2_TEXT_WIDTH, intermediate_size=96,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                            hidden_act="gelu", pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer = CLIPTextModel(config).eval()
        for module in transformer.modules():
            if isinstance(module, nn.LayerNorm):  # not the degenerate 1/0 init (see lohatrain.demo)
                nn.init.normal_(module.weight, mean=1.0, std=0.2)
                nn.init.normal_(module.bias, mean=0.1, std=0.2)
    return transformer.requires_grad_(False)


@torch.no_grad()
def load_model_for_a1111(kind="sd1", seed=0):
    """The tiny SD1 or SD 2.x (768-v) model as reForge loads a checkpoint; the UNet goes "directly to GPU"."""
    from lohatrain.demo import build_tiny_sd1, build_tiny_sd2
    from lohatrain.text_encoders import clip_tokenizer

    sd_model = build_tiny_sd1(seed) if kind == "sd1" else build_tiny_sd2(seed)
    unet = ModelPatcher(BaseModel(sd_model.model.diffusion_model, sd_model.scale_factor), model_management.gpu,
                        model_management.cpu)
    if kind == "sd1":
        wrapped = sd_model.cond_stage_model
        clip = Part(Holder(clip_l=Holder(transformer=wrapped.transformer)))
    else:
        wrapped = FrozenOpenCLIPEmbedder(_sd2_clip_h(seed), clip_tokenizer())
        clip = Part(Holder(clip_h=Holder(transformer=wrapped.transformer)))
    vae = Part(Holder(first_stage_model=sd_model.first_stage_model))
    sd_model.forge_objects = ForgeSD(unet, clip, vae)
    sd_model.forge_objects_original = sd_model.forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects.shallow_copy()
    sd_model.cond_stage_model = (CLIP_SD_15_L if kind == "sd1" else CLIP_SD_21_H)(wrapped, sd_model)
    sd_model.is_sd2 = not sd_model.is_sdxl and hasattr(sd_model.cond_stage_model, "model")
    sd_model.is_sd1 = not sd_model.is_sdxl and not sd_model.is_sd2
    model_management.load_models_gpu([unet], force_full_load=True)

    @torch.inference_mode()
    def encode_first_stage(x):
        vae_part = sd_model.forge_objects.vae
        model_management.load_models_gpu([vae_part.patcher])
        return vae_part.model.first_stage_model.encode(x).sample() * sd_model.scale_factor

    @torch.inference_mode()
    def decode_first_stage(z):
        vae_part = sd_model.forge_objects.vae
        model_management.load_models_gpu([vae_part.patcher])
        return vae_part.model.first_stage_model.decode(z / sd_model.scale_factor)

    sd_model.encode_first_stage, sd_model.decode_first_stage = encode_first_stage, decode_first_stage
    sd_model.get_first_stage_encoding = lambda x: x
    sd_model.current_lora_hash = str([])
    return sd_model


def load_networks(sd_model, loras):
    """The Lora extension for a prompt's `<lora:…>`: `loras` is [(name, file tensors)], each at strength 1."""
    apply_loras(sd_model, [(name, 1.0, 1.0) for name, _ in loras], dict(loras).__getitem__)


def apply_loras(sd_model, targets, read):
    """networks.py `load_networks` once the files are found: `targets` is [(file, unet multiplier, te multiplier)];
    nothing changes when they are the last prompt's, else the unpatched UNet and CLIP patchers are cloned with every
    file's patches (`read(file)`'s tensors) at their multipliers (`load_lora_for_models`)."""
    lora_hash = str([list(target) for target in targets])
    if sd_model.current_lora_hash == lora_hash:
        return
    sd_model.current_lora_hash = lora_hash
    objects, original = sd_model.forge_objects, sd_model.forge_objects_original
    objects.unet, objects.clip = original.unet, original.clip
    for file, unet_multiplier, te_multiplier in targets:
        objects.unet, objects.clip = load_lora_for_models(objects.unet, objects.clip, read(file), unet_multiplier,
                                                          te_multiplier)
    sd_model.forge_objects_after_applying_lora = objects.shallow_copy()


def load_lora_for_models(model, clip, lora, strength_model, strength_clip):
    """ldm_patched/modules/sd.py: one key map of the UNet's and the CLIP's keys (ComfyUI's rules; a part at strength 0
    is left out), the file's patches, and clones of both patchers given them (each keeps the keys it has)."""
    key_map = {}
    if strength_model != 0:
        key_map = model_lora_keys_unet(model.model, key_map)
    if strength_clip != 0:
        key_map = model_lora_keys_clip(clip.cond_stage_model, key_map)
    if not key_map:
        return model, clip
    loaded, _ = load_lora(lora, key_map)
    new_model, new_clip = model.clone(), clip.clone()
    new_model.add_patches(loaded, strength_model)
    new_clip.add_patches(loaded, strength_clip)
    return new_model, new_clip


@torch.inference_mode()
def txt2img(sd_model, prompt, loras=None):
    """One image as process_images_inner makes it (extra networks off when `loras` is None); returns the UNet's
    output on a fixed latent and the decoded image."""
    sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
    if loras is not None:
        load_networks(sd_model, loras)
    sd_model.forge_objects = sd_model.forge_objects_after_applying_lora.shallow_copy()
    cond = sd_model.get_learned_conditioning([prompt])
    unet = sd_model.forge_objects.unet
    model_management.load_models_gpu([unet])  # sampling_prepare
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = unet.model.diffusion_model(x, torch.tensor([500.0]), context=cond)
    return out, sd_model.decode_first_stage(out)
