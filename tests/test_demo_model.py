"""The tiny SD1 model must behave like the WebUI's SD1 model wherever training depends on it."""

import torch
from torch import nn

from lohatrain.demo import build_tiny_sd1, make_sample_dataset
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import ResBlock


def test_tokenizer_gives_real_clip_ids(tiny_model):
    """Captions must tokenize exactly as with SD1's CLIP tokenizer, padding included."""
    tokenizer = tiny_model.cond_stage_model.tokenizer
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer(["red circle"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id == 49407


def test_conditioning_depends_on_prompt_and_empty_prompt_has_nonzero_mean(tiny_model):
    """Different prompts must condition differently, and the WebUI's emphasis renormalisation
    divides by the conditioning's mean, which must not vanish even for the empty prompt."""
    with torch.no_grad():
        cond = tiny_model.get_learned_conditioning(["red circle, blue background", ""])
    assert cond.shape == (2, 77, tiny_model.cond_stage_model.transformer.config.hidden_size)
    assert not torch.allclose(cond[0], cond[1])
    assert cond[1].mean().abs() > 0.01


def test_clip_skip_uses_penultimate_layer_through_final_layer_norm(tiny_model):
    """`layer="hidden"` must select an earlier layer, normalised by the final layer norm as the WebUI does."""
    embedder = tiny_model.cond_stage_model
    prompts = ["red circle, blue background"]
    with torch.no_grad():
        last = tiny_model.get_learned_conditioning(prompts)
        embedder.layer, embedder.layer_idx = "hidden", -1
        hidden_last = tiny_model.get_learned_conditioning(prompts)
        embedder.layer_idx = -2
        skip2 = tiny_model.get_learned_conditioning(prompts)
    torch.testing.assert_close(hidden_last, last)
    assert skip2.shape == last.shape and not torch.allclose(skip2, last)


def test_model_has_sd1_layout_and_host_attributes(tiny_model):
    """LoHa key names and SD1 detection depend on SD1's exact module layout and the host's flags."""
    unet = tiny_model.model.diffusion_model
    assert (len(unet.input_blocks), len(unet.middle_block), len(unet.output_blocks)) == (12, 3, 12)
    attention = sorted(name for name, m in unet.named_modules() if isinstance(m, SpatialTransformer))
    expected = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
    expected += [f"output_blocks.{i}.1" for i in range(3, 12)]
    assert attention == sorted(expected)
    assert (tiny_model.is_sd1, tiny_model.is_sd2, tiny_model.is_sdxl) == (True, False, False)
    assert tiny_model.parameterization == "eps" and tiny_model.num_timesteps == 1000
    assert tiny_model.alphas_cumprod.shape == (1000,) and tiny_model.alphas_cumprod.dtype == torch.float32
    assert tiny_model.scale_factor == 0.18215
    assert not tiny_model.training


def test_first_stage_encodes_8x_down_to_4_channels(tiny_model):
    """Like SD's VAE: (B,3,H,W) in [-1,1] to (B,4,H/8,W/8) latents and back."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = tiny_model.get_first_stage_encoding(tiny_model.encode_first_stage(x))
        assert z.shape == (2, 4, 8, 8)
        assert tiny_model.decode_first_stage(z).shape == (2, 3, 64, 64)


def test_training_step_reaches_every_unet_layer(tiny_model):
    """No zero-initialised layer may cut off gradients: every Linear/Conv2d in the UNet's
    ResBlocks and attention blocks (where a LoHa goes) must get a non-zero gradient."""
    gen = torch.Generator().manual_seed(0)
    # 128 px gives 16x16 latents, so the middle block works on 2x2; at 1x1 its
    # self-attention softmax is constant and attn1.to_q/to_k get no gradient (as in any SD1).
    x = torch.rand(2, 3, 128, 128, generator=gen) * 2 - 1
    with torch.no_grad():
        z = tiny_model.get_first_stage_encoding(tiny_model.encode_first_stage(x))
        cond = tiny_model.get_learned_conditioning(["red circle", "blue square"])
    t = torch.randint(0, tiny_model.num_timesteps, (2,), generator=gen)
    noise = torch.randn(z.shape, generator=gen)
    loss = (tiny_model.apply_model(tiny_model.q_sample(z, t, noise), t, cond) - noise).pow(2).mean()
    loss.backward()

    unet = tiny_model.model.diffusion_model
    checked, dead = 0, []
    for block_name, block in unet.named_modules():
        if not isinstance(block, (ResBlock, SpatialTransformer)):
            continue
        for name, layer in block.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                checked += 1
                if layer.weight.grad is None or not layer.weight.grad.any():
                    dead.append(f"{block_name}.{name}")
    assert checked > 100 and dead == []


def test_same_seed_same_weights_other_seed_different():
    """Tests and demos compare runs, so the model must be a pure function of the seed."""
    a, b, c = build_tiny_sd1(1).state_dict(), build_tiny_sd1(1).state_dict(), build_tiny_sd1(2).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_building_leaves_global_rng_untouched():
    """Building the model must not shift the caller's own random stream."""
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_tiny_sd1(0)
    assert torch.equal(torch.get_rng_state(), state)


def test_sample_dataset_is_deterministic_images_with_captions(sample_dataset, tmp_path):
    """The demo dataset: PNGs of varied sizes, each with a same-named comma-tag caption, fixed by the seed."""
    from PIL import Image

    images = sorted(sample_dataset.glob("*.png"))
    assert 6 <= len(images) <= 8
    sizes = set()
    for image in images:
        with Image.open(image) as im:
            assert im.mode == "RGB"
            sizes.add(im.size)
        caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert len(caption.split(", ")) >= 3
    assert len({w / h for w, h in sizes}) >= 3

    again = make_sample_dataset(tmp_path / "again")
    other = make_sample_dataset(tmp_path / "other", seed=1)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in sample_dataset.iterdir())
    assert any((other / p.name).read_bytes() != p.read_bytes() for p in sample_dataset.iterdir())
