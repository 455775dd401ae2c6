"""Training on the model the way the WebUI holds it on a GPU: fp16 (its default) or bf16 weights, or float8
Linear/Conv2d weights with its FP8 weight option; and the torch range from the stock WebUI's 2.1.2 up.

The tiny model is converted exactly as the WebUI v1.10.1 converts a loaded checkpoint
(modules/sd_models.py, load_model_weights): `half()` with `alphas_cumprod` kept in float32, then for FP8
every Linear and Conv2d outside the VAE `.to(torch.float8_e4m3fn)`.

Which case runs where: CPU autocast runs bf16 on every supported torch and fp16 from torch 2.3 (with a CPU
GradScaler); on an older torch a CPU fp16 run is refused with a message, which is what is tested there.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lohatrain.families import ldm_parts
from lohatrain import compat
from lohatrain.errors import LohatrainError
from lohatrain.network import LayerPlan, Network
from lohatrain.trainer import train

from runs import hold_like_the_webui, model_state, settings_for

CPU_FP16 = compat.autocast_supports("cpu", torch.float16)


@pytest.mark.parametrize("held,train_dtype", [
    ("fp16", "fp16"), ("fp16", "bf16"), ("bf16", "bf16"), ("fp8", "bf16"), ("fp8", "fp16")])
def test_a_model_held_in_low_precision_trains_and_is_left_bit_identical(tiny_model, sample_dataset, tmp_path,
                                                                        held, train_dtype):
    model = hold_like_the_webui(tiny_model, held)
    before = model_state(model)
    s = settings_for(sample_dataset, tmp_path / "out", steps=2, train_dtype=train_dtype, save_dtype="fp16",
                     conv_dim=2, conv_alpha=1)
    if train_dtype == "fp16" and not CPU_FP16:
        with pytest.raises(LohatrainError, match=r"cannot train in fp16 on the CPU: set Train format to bf16"):
            train(ldm_parts(model), s)
        assert not (tmp_path / "out").exists()
    else:
        result = train(ldm_parts(model), s)
        assert result.status == "done" and len(result.losses) == 2
        assert all(0 < loss < 10 for loss in result.losses)
        tensors = load_file(result.file)
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        # the LoHa learned something: the trained half of each pair left zero
        assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("hada_w2_a"))
    assert model_state(model) == before


@pytest.mark.parametrize("held,setting", [("fp16", "--no-half"), ("fp8", "FP8 weight")])
def test_fp32_on_a_low_precision_model_says_what_to_do(tiny_model, sample_dataset, tmp_path, held, setting):
    model = hold_like_the_webui(tiny_model, held)
    before = model_state(model)
    with pytest.raises(LohatrainError, match="set Train format to fp16 or bf16") as error:
        train(ldm_parts(model), settings_for(sample_dataset, tmp_path / "out", steps=2, train_dtype="fp32"))
    assert setting in str(error.value)
    assert not (tmp_path / "out").exists()
    assert model_state(model) == before


@pytest.mark.parametrize("held", [torch.float16, torch.float8_e4m3fn])
def test_merged_weight_is_rounded_once(held):
    """The layer runs with round(W + ΔW): the sum taken in float32, then one rounding to the op's dtype."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16, bias=False)
    layer.weight.data = (torch.randn(16, 16) * 4).to(held)
    network = Network([LayerPlan("lora_unet_test", layer, dim=2, alpha=2.0)], seed=3)
    with torch.no_grad():
        for p in network.adapters[0].parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    delta = network.adapters[0].delta().detach()
    once = (layer.weight.float() + delta).to(torch.bfloat16)
    if held == torch.float16:  # ΔW rounded to W's dtype, added there, rounded again (float8 cannot even add)
        assert not torch.equal(once, (layer.weight + delta.to(held)).to(torch.bfloat16))
    network.attach()
    try:
        with torch.no_grad():
            used = layer(torch.eye(16).to(torch.bfloat16)).T  # identity input: the output is the weight
    finally:
        network.detach()
    assert torch.equal(used, once)


def test_an_error_in_the_middle_of_a_step_reaches_the_user_as_itself(tiny_model, sample_dataset, tmp_path):
    """On torch 2.1.2 an `except torch.OutOfMemoryError` clause (2.5+) turned every error into AttributeError."""
    before = model_state(tiny_model)
    calls = []

    def fail_on_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")

    hook = tiny_model.model.diffusion_model.middle_block.register_forward_pre_hook(fail_on_second_call)
    try:
        with pytest.raises(RuntimeError, match="CUDNN_STATUS_INTERNAL_ERROR"):
            train(ldm_parts(tiny_model), settings_for(sample_dataset, tmp_path / "out", steps=3))
    finally:
        hook.remove()
    assert model_state(tiny_model) == before
    # nothing half-written, no temp files: only the state of step 1, the last whole step, to resume from
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["test-loha.lohatrain-state"]


def test_lycoris_is_the_version_install_py_picks_for_this_torch():
    """What the WebUI's start-up gives this environment is what the engine runs with (both CI environments)."""
    import importlib.metadata
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("lohatrain_install", Path(__file__).parents[1] / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    lycoris = importlib.metadata.version("lycoris-lora")
    assert lycoris == install.lycoris_for(torch.__version__)
    assert install.lycoris_works(lycoris, torch.__version__)


def test_fused_attention_merges_a_half_weight_in_float32():
    """SD2/SDXL's OpenCLIP attention: in_proj (fp16) and out_proj (float8 with FP8) merged once, in float32."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True).to(torch.bfloat16)
    from lohatrain.network import plan_fused_attention

    network = Network(plan_fused_attention("lora_te2_layer", attention, dim=2, alpha=2.0), seed=1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    x = torch.randn(1, 3, 8, dtype=torch.bfloat16)
    deltas = [adapter.delta().detach() for adapter in network.adapters]
    in_w = (attention.in_proj_weight.float() + torch.cat(deltas[:3])).to(torch.bfloat16)
    out_w = (attention.out_proj.weight.float() + deltas[3]).to(torch.bfloat16)
    xt = x.transpose(0, 1)
    expected, _ = F.multi_head_attention_forward(
        xt, xt, xt, 8, 2, in_w, attention.in_proj_bias, None, None,
        False, 0.0, out_w, attention.out_proj.bias, training=False, need_weights=False)
    network.attach()
    try:
        with torch.no_grad():
            got, _ = attention(x, x, x, need_weights=False)
    finally:
        network.detach()
    torch.testing.assert_close(got, expected.transpose(0, 1), rtol=0, atol=0)
