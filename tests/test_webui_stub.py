"""The WebUI stand-in (tests/webui_stub) must behave as the host (v1.10.1) where lohatrain's adapter relies on it."""

import copy
import dataclasses
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lohatrain.demo  # noqa: F401  (before anything that imports ldm)

STUB = str(Path(__file__).resolve().parent / "webui_stub")
if STUB not in sys.path:
    sys.path.insert(0, STUB)

import host_rules  # noqa: E402
import networks  # noqa: E402
from modules import call_queue, fifo_lock, processing, script_callbacks, sd_models, shared  # noqa: E402

STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Fast and stable on a busy 2-core machine; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def webui(tmp_path):
    """A fresh host: empty checkpoint and Lora folders, no model loaded, default options."""
    o = shared.cmd_opts
    saved = (o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat, sd_models.model_factory)
    saved_model = (sd_models.model_data, shared.opts.data.get("sd_model_checkpoint"))  # a session page's model
    o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat = (str(tmp_path / d) for d in ("ckpt", "Lora", "LyCORIS"))
    for d in ("ckpt", "Lora"):
        (tmp_path / d).mkdir()
    sd_models.model_data = sd_models.SdModelData()
    shared.opts.data["sd_model_checkpoint"] = None
    networks.loaded_networks.clear()
    networks.networks_in_memory.clear()
    networks.list_available_networks()
    sd_models.list_models()
    yield tmp_path
    o.ckpt_dir, o.lora_dir, o.lyco_dir_backcompat, sd_models.model_factory = saved
    sd_models.model_data, shared.opts.data["sd_model_checkpoint"] = saved_model
    sd_models.list_models()
    networks.loaded_networks.clear()
    shared.state.interrupted = shared.state.skipped = False


def write_checkpoint(folder: Path, name: str, seed: int) -> Path:
    path = folder / "ckpt" / f"{name}.safetensors"
    save_file(lohatrain.demo.build_tiny_sd1(seed).state_dict(), str(path))
    return path


def loaded(folder: Path, name: str = "base", seed: int = 0):
    write_checkpoint(folder, name, seed)
    sd_models.list_models()
    sd_models.reload_model_weights()
    return shared.sd_model


def generate(prompt: str, seed: int = 7, **kw):
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, seed=seed, steps=STEPS, width=64, height=64,
                                                    do_not_save_grid=True, do_not_save_samples=True, **kw)
    return processing.process_images(p)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def test_state_begin_interrupt_end_and_preview():
    state = shared.state
    state.interrupted = state.skipped = True
    state.job_count, state.job_no, state.sampling_step = 5, 3, 9
    state.begin(job="task(x)")
    assert (state.job, state.job_count, state.job_no, state.sampling_step) == ("task(x)", -1, 0, 0)
    assert not state.interrupted and not state.skipped and state.current_image is None
    state.interrupt()
    state.skip()
    assert state.interrupted and state.skipped and state.dict()["interrupted"]
    from PIL import Image
    state.assign_current_image(Image.new("RGB", (8, 8)))
    state.assign_current_image(Image.new("RGB", (8, 8)))
    assert state.id_live_preview == 2 and state.current_image.size == (8, 8)
    state.nextjob()
    assert state.job_no == 1
    state.end()
    assert state.job == "" and state.job_count == 0
    assert state.interrupted, "end() leaves Interrupt set; only wrap_gradio_call clears it"
    state.interrupted = state.skipped = False


def test_queue_lock_is_fifo_and_not_reentrant():
    lock = call_queue.queue_lock
    assert isinstance(lock, fifo_lock.FIFOLock)
    order, threads = [], []

    def worker(name):
        with lock:
            order.append(name)

    lock.acquire()
    try:
        assert lock.acquire(blocking=False) is False  # the holder cannot take it again
        for i, name in enumerate("ABC"):
            t = threading.Thread(target=worker, args=(name,))
            t.start()
            threads.append(t)
            waited = threading.Event()
            for _ in range(10000):  # until this thread is queued: the order of arrival is then fixed
                if lock.waiting() == i + 1:
                    break
                waited.wait(0.001)
            assert lock.waiting() == i + 1
    finally:
        lock.release()
    for t in threads:
        t.join(10)
    assert order == ["A", "B", "C"] and not lock.locked()


def test_wrap_gradio_gpu_call_success_and_error():
    seen = {}

    def ok(id_task, x):
        seen["job"], seen["locked"] = shared.state.job, call_queue.queue_lock.locked()
        shared.state.interrupt()
        return [x * 2, "<p>done</p>"]

    out = call_queue.wrap_gradio_gpu_call(ok)("task(abc)", 21)
    assert isinstance(out, tuple) and out[0] == 42 and out[1].startswith("<p>done</p><div class='performance'>")
    assert seen == {"job": "task(abc)", "locked": True}
    assert not shared.state.interrupted and shared.state.job_count == 0 and not call_queue.queue_lock.locked()

    def bad(id_task):
        raise ValueError("no <dataset>")

    out = call_queue.wrap_gradio_gpu_call(bad, extra_outputs=[None])("task(x)")
    assert len(out) == 2 and out[0] is None
    assert out[1].startswith("<div class='error'>ValueError: no &lt;dataset&gt;</div>")
    assert not call_queue.queue_lock.locked()


def test_options_and_callbacks():
    opts = shared.opts
    assert opts.CLIP_stop_at_last_layers == 1 and opts.emphasis == "Original"
    info = shared.OptionInfo(3, "Three", section=("x", "X")).info("hint").needs_reload_ui()
    opts.add_option("stub_test_option", info)
    assert opts.stub_test_option == 3 and "hint" in info.comment_after
    assert opts.set("stub_test_option", 4) is True and opts.data["stub_test_option"] == 4
    assert opts.set("stub_test_option", 4) is False
    with pytest.raises(KeyError):
        opts.set("stub_never_registered", 1)

    tab = lambda: [("blocks", "Title", "elem")]  # noqa: E731
    script_callbacks.on_ui_tabs(tab)
    script_callbacks.on_ui_tabs(lambda: 1 / 0)  # reported, not raised
    try:
        assert ("blocks", "Title", "elem") in script_callbacks.ui_tabs_callback()
    finally:
        script_callbacks.callback_map["callbacks_ui_tabs"].clear()


def test_reload_model_weights_sets_model_and_calls_callbacks(webui):
    calls = []
    callback = calls.append
    script_callbacks.on_model_loaded(callback)
    try:
        path = write_checkpoint(webui, "base", 0)
        sd_models.list_models()
        assert sd_models.checkpoint_tiles() == ["base.safetensors"]  # no hash before the first load
        model = sd_models.reload_model_weights()
        info = model.sd_checkpoint_info
        assert shared.sd_model is model and calls == [model]
        assert model.is_sd1 and info.filename == str(path) and len(info.sha256) == 64
        assert info.title == f"base.safetensors [{info.shorthash}]" == shared.opts.sd_model_checkpoint
        assert model.sd_model_hash == info.shorthash
        assert type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords"
        assert hasattr(model.cond_stage_model.wrapped, "transformer")
        reference = lohatrain.demo.build_tiny_sd1(0).state_dict()
        torch.testing.assert_close(model.model.state_dict(), {k[6:]: v for k, v in reference.items()
                                                               if k.startswith("model.")}, rtol=0, atol=0)

        assert sd_models.reload_model_weights() is model and len(calls) == 1  # same file: nothing happens

        write_checkpoint(webui, "other", 1)  # same architecture: loaded into the same object
        sd_models.list_models()
        assert sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("other")) is None
        assert shared.sd_model is model and calls == [model, model]
        assert model.sd_checkpoint_info.name == "other.safetensors"
    finally:
        script_callbacks.remove_callbacks_for_function(callback)


def test_process_images_is_deterministic_per_seed(webui):
    loaded(webui)
    first, again, other = generate("red circle", seed=5), generate("red circle", seed=5), generate("red circle", seed=6)
    assert first.images[0].size == (64, 64) and first.seed == 5 and "Seed: 5" in first.info
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert shared.state.sampling_steps == STEPS


def _loha_file(model, folder: Path, name: str) -> tuple[Path, dict]:
    """Random LoHa for a diffusers-named UNet Linear, an ldm-named 3x3 conv and a text-encoder Linear, plus
    one key that matches nothing."""
    g = torch.Generator().manual_seed(0)
    keys = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_unet_input_blocks_1_0_in_layers_2",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_unet_no_such_layer"]
    tensors, r = {}, 4
    for key in keys:
        module = host_rules.find_module(model, key)
        out_dim, fan_in = (module.weight.shape[0], module.weight[0].numel()) if module is not None else (8, 8)
        for i in (1, 2):
            tensors[f"{key}.hada_w{i}_a"] = torch.randn(out_dim, r, generator=g) * 0.3
            tensors[f"{key}.hada_w{i}_b"] = torch.randn(r, fan_in, generator=g) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    path = folder / "Lora" / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"ss_output_name": "shiny", "ss_network_module": "lycoris.kohya"})
    return path, tensors


def test_loha_in_prompt_changes_image_and_weights_come_back_exactly(webui):
    model = loaded(webui)
    pure = copy.deepcopy(model.state_dict())
    plain = generate("red circle")
    _, tensors = _loha_file(model, webui, "my_loha")
    networks.list_available_networks()
    assert networks.available_networks["my_loha"].alias == "shiny"

    with_loha = generate("red circle <lora:my_loha:1>")
    assert [n.name for n in networks.loaded_networks] == ["my_loha"]
    assert sorted(networks.last_unmatched_keys) == sorted(k for k in tensors if k.startswith("lora_unet_no_such_layer"))
    assert not np.array_equal(pixels(plain), pixels(with_loha))
    assert "Lora hashes: my_loha:" in with_loha.info

    # the weights now carry exactly what an independent reading of the host's rules adds
    expected = copy.deepcopy(model)
    expected.load_state_dict(pure)
    assert host_rules.apply_file(expected, tensors) == ["lora_unet_no_such_layer"]
    for key in tensors:
        module = host_rules.find_module(model, key.partition(".")[0])
        if module is not None:
            torch.testing.assert_close(module.weight, host_rules.find_module(expected, key.partition(".")[0]).weight)
            assert module.network_current_names == (("my_loha", 1.0, 1.0, None),)

    by_alias = generate("red circle <lora:shiny:1>")  # the alias from ss_output_name works too
    assert np.array_equal(pixels(by_alias), pixels(with_loha))

    again = generate("red circle")
    assert networks.loaded_networks == []
    assert np.array_equal(pixels(again), pixels(plain))
    current = model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in pure.items()), "weights must be restored bit-exactly"


def test_the_users_text_encoder_lora_is_off_while_a_run_encodes_its_captions(webui, sample_dataset, run_job):
    """The last generation's LoRA on the text encoder (A1111 merges it into the weights while the prompt encodes)
    changes nothing in the run: the same step-1 loss as after a plain generation."""
    from test_engine import settings_for
    from users_loras import text_encoder_lora

    model = loaded(webui)
    save_file(text_encoder_lora(model.cond_stage_model.wrapped.transformer), str(webui / "Lora" / "users.safetensors"))
    networks.list_available_networks()
    settings = settings_for(sample_dataset, webui / "unused", steps=1)

    def first_loss(name: str) -> float:
        run = dataclasses.replace(settings, name=name)
        return run_job(run)[0].losses[0]

    with_lora = generate("blue circle <lora:users:1>")
    after_lora = first_loss("after-lora")
    plain = generate("blue circle")
    assert not np.array_equal(pixels(with_lora), pixels(plain))  # the LoRA did change the text encoder
    assert after_lora == first_loss("after-plain")


def test_network_weights_change_lazily_as_in_the_host(webui):
    """load_networks() only chooses; a layer's weights change when it runs. Restoring is an in-place copy
    outside no_grad, so it fails on parameters that require grad while grad mode is on."""
    model = loaded(webui)
    _loha_file(model, webui, "lazy")
    generate("x <lora:lazy:0.5>")
    layer = host_rules.find_module(model, "lora_unet_input_blocks_1_0_in_layers_2")
    applied = layer.weight.detach().clone()
    assert not torch.equal(applied, layer.network_weights_backup)

    networks.load_networks([])
    assert torch.equal(layer.weight, applied), "nothing restored before the layer runs"
    layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="in-place"):
        networks.network_restore_weights_from_backup(layer)
    with torch.no_grad():
        networks.network_restore_weights_from_backup(layer)
        layer.network_current_names = ()
    assert torch.equal(layer.weight, layer.network_weights_backup)


def test_interrupt_stops_sampling_and_still_returns_an_image(webui):
    """As the host: Interrupt during sampling decodes the last denoised estimate, and no further batch runs."""
    model = loaded(webui)
    handle = model.model.diffusion_model.register_forward_hook(lambda *a: shared.state.interrupt())
    try:
        shared.state.begin(job="t")
        result = generate("red circle", n_iter=2)
        assert len(result.images) == 1 and shared.state.job_no == 1
    finally:
        handle.remove()
        shared.state.end()
        shared.state.interrupted = False


# --- SDXL -------------------------------------------------------------------------------------------------------

CLIP_L_WIDTH, BIGG_WIDTH, SIZE_DIM = 32, 48, 16  # the tiny SDXL's text widths and size-embedding width


def placeholder_checkpoint(folder: Path, name: str) -> Path:
    """A checkpoint file that holds no state dict: the stand-in's factory builds the model ("xl" in the name:
    the tiny SDXL) and its weights stay."""
    path = folder / "ckpt" / f"{name}.ckpt"
    path.write_bytes(b"placeholder, not a state dict")
    return path


def loaded_sdxl(folder: Path, name: str = "tiny-XL"):
    placeholder_checkpoint(folder, name)
    sd_models.list_models()
    sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match(name))
    return shared.sd_model


def size_part(model, h: int, w: int, top: int = 0, left: int = 0) -> torch.Tensor:
    """The end of the vector as sgm's size embedders make it for one image: original (h, w), crop, target (h, w)."""
    values = {"original_size_as_tuple": (h, w), "crop_coords_top_left": (top, left), "target_size_as_tuple": (h, w)}
    embedders = [e for e in model.conditioner.embedders if e.input_key in values]
    return torch.cat([e(torch.tensor([values[e.input_key]], dtype=torch.float32)) for e in embedders], dim=1)[0]


def test_sdxl_checkpoint_loads_as_the_host_loads_it_and_switching_family_builds_a_new_model(webui):
    import zlib

    from lohatrain.demo_sdxl import build_tiny_sdxl
    from lohatrain.sgm_standin import OpenCLIPEmbedder2, SDXLCLIPEmbedder
    from modules import sd_hijack, sd_hijack_clip, sd_hijack_open_clip

    sd1 = loaded(webui)
    path = placeholder_checkpoint(webui, "tiny-XL")
    sd_models.list_models()
    xl = sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-XL"))
    assert xl is shared.sd_model and xl is not sd1 and next(sd1.parameters()).device.type == "meta"
    assert xl.is_sdxl and not (xl.is_sd1 or xl.is_sd2 or xl.is_ssd or xl.is_sdxl_inpaint)
    assert xl.model_type == sd_models.ModelType.SDXL and xl.sd_checkpoint_info.filename == str(path)
    assert xl.used_config != sd1.used_config

    # sd_models_xl: the host's methods and fields
    assert xl.parameterization == "eps" and xl.cond_stage_key == "txt" and xl.model.conditioning_key == "crossattn"
    assert xl.alphas_cumprod.dtype == torch.float32 and xl.alphas_cumprod.shape == (1000,)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2  # sgm's LegacyDDPMDiscretization
    torch.testing.assert_close(xl.alphas_cumprod, torch.from_numpy(np.cumprod(1.0 - betas)).float())
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(xl.get_first_stage_encoding(x), x)
    assert type(xl.conditioner.wrapped) is torch.nn.Module and not list(xl.conditioner.wrapped.parameters())
    assert isinstance(xl.cond_stage_model_empty_prompt, torch.Tensor)  # the host keeps "crossattn" only

    # the hijack: both text embedders wrapped in place, the size embedders untouched, cond_stage_model = conditioner
    e = xl.conditioner.embedders
    assert type(e[0]) is sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords
    assert type(e[1]) is sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords
    assert isinstance(e[0].wrapped, SDXLCLIPEmbedder) and isinstance(e[1].wrapped, OpenCLIPEmbedder2)
    assert (e[1].return_pooled, e[0].return_pooled, e[1].input_key, e[1].is_trainable) == (True, False, "txt", False)
    assert e[1].legacy_ucg_val is None and e[1].id_pad == 0 and e[0].id_pad == e[0].id_end
    assert [type(m).__name__ for m in e[2:]] == ["ConcatTimestepEmbedderND"] * 3
    assert xl.cond_stage_model is xl.conditioner
    sd_hijack.model_hijack.undo_hijack(xl)
    assert isinstance(xl.conditioner.embedders[0], SDXLCLIPEmbedder) and not hasattr(xl, "cond_stage_model")
    sd_hijack.model_hijack.hijack(xl)

    # the factory's weights (placeholder file), seeded from the file name
    reference = build_tiny_sdxl(zlib.crc32(b"tiny-XL") % 1000).model.state_dict()
    torch.testing.assert_close(xl.model.state_dict(), reference, rtol=0, atol=0)

    back = sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("base"))
    assert back is shared.sd_model and back is not xl and back.is_sd1 and not back.is_sdxl
    assert type(back.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords"


def test_sdxl_get_learned_conditioning_follows_the_host(webui):
    """crossattn = CLIP-L's penultimate hidden state (no final norm) beside bigG's penultimate one, 77 tokens per
    75-token chunk; vector = bigG's pooled (first chunk) + the sizes: the prompt list's width/height (1024 for a
    plain list), crop from the options; an empty negative prompt gives zero text embeddings."""
    from modules import prompt_parser

    model = loaded_sdxl(webui)
    clip_l, bigg = (e.wrapped for e in model.conditioner.embedders[:2])
    prompts = prompt_parser.SdConditioning(["red circle", "blue square on green"], width=64, height=96)
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        assert c["crossattn"].shape == (2, 77, CLIP_L_WIDTH + BIGG_WIDTH)
        assert c["vector"].shape == (2, BIGG_WIDTH + 6 * SIZE_DIM)
        # short prompts: what sgm's own embedders give for them (the wrappers' chunking changes nothing)
        bigg_hidden, pooled = bigg(list(prompts))
        torch.testing.assert_close(c["crossattn"][..., :CLIP_L_WIDTH], clip_l(list(prompts)))
        torch.testing.assert_close(c["crossattn"][..., CLIP_L_WIDTH:], bigg_hidden)
        torch.testing.assert_close(c["vector"][:, :BIGG_WIDTH], pooled)
        for row in c["vector"]:
            torch.testing.assert_close(row[BIGG_WIDTH:], size_part(model, 96, 64))

        plain = model.get_learned_conditioning(["red circle"])
        torch.testing.assert_close(plain["vector"][0, BIGG_WIDTH:], size_part(model, 1024, 1024))
        shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left = 8, 16
        try:
            cropped = model.get_learned_conditioning(["red circle"])
        finally:
            shared.opts.sdxl_crop_top = shared.opts.sdxl_crop_left = 0
        torch.testing.assert_close(cropped["vector"][0, BIGG_WIDTH:], size_part(model, 1024, 1024, 8, 16))

        long = model.get_learned_conditioning(["red circle", " ".join(["dot"] * 100)])
        assert long["crossattn"].shape == (2, 154, CLIP_L_WIDTH + BIGG_WIDTH)
        torch.testing.assert_close(long["crossattn"][:1, :77], plain["crossattn"])  # chunk 1 of the short prompt
        torch.testing.assert_close(long["vector"][:1], plain["vector"])
        first_chunk = model.get_learned_conditioning([" ".join(["dot"] * 75)])
        torch.testing.assert_close(long["vector"][1], first_chunk["vector"][0])  # pooled from the first chunk

        negative = model.get_learned_conditioning(prompt_parser.SdConditioning(["", ""], is_negative_prompt=True))
        assert not negative["crossattn"].any() and not negative["vector"][:, :BIGG_WIDTH].any()
        assert negative["vector"][:, BIGG_WIDTH:].any()

        # CLIP skip reaches CLIP-L only with the host's sdxl_clip_l_skip option (then without the final norm)
        shared.opts.CLIP_stop_at_last_layers = 3
        try:
            ignored = model.get_learned_conditioning(["red circle"])
            shared.opts.sdxl_clip_l_skip = True
            skipped = model.get_learned_conditioning(["red circle"])
        finally:
            shared.opts.CLIP_stop_at_last_layers, shared.opts.sdxl_clip_l_skip = 1, False
        assert torch.equal(ignored["crossattn"], plain["crossattn"])
        tokens = clip_l.tokenizer(["red circle"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
        torch.testing.assert_close(skipped["crossattn"][..., :CLIP_L_WIDTH],
                                   clip_l.transformer(input_ids=tokens, output_hidden_states=True).hidden_states[-3])
        assert torch.equal(skipped["crossattn"][..., CLIP_L_WIDTH:], plain["crossattn"][..., CLIP_L_WIDTH:])


def test_txt2img_on_sdxl_conditions_on_the_generation_size(webui):
    model = loaded_sdxl(webui)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="red circle", seed=5, steps=STEPS, width=64, height=64,
                                                    do_not_save_grid=True, do_not_save_samples=True)
    first = processing.process_images(p)
    assert first.images[0].size == (64, 64) and "Seed: 5" in first.info
    assert set(p.c) == {"crossattn", "vector"} and p.c["vector"].shape == (1, BIGG_WIDTH + 6 * SIZE_DIM)
    torch.testing.assert_close(p.c["vector"][0, BIGG_WIDTH:], size_part(model, 64, 64))
    assert not p.uc["crossattn"].any()  # the empty negative prompt
    assert np.array_equal(pixels(first), pixels(generate("red circle", seed=5)))
    assert not np.array_equal(pixels(first), pixels(generate("blue square", seed=5)))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _trained_file_through_the_host(model, webui, sample_dataset, name: str, **settings) -> tuple[dict, list[str]]:
    """Train a small network (LoHa unless `settings` say otherwise; UNet with conv layers, and the text encoders)
    on the loaded model and generate with it as the host does. Checked here for every family and type: training
    leaves the weights as they were, every key lands, the image changes, the weights carry what an independent
    reading of the host's rules adds, and come back exactly afterwards. Returns the file's tensors and the names
    of the weights the file changed."""
    from test_engine import settings_for

    from lohatrain.families import ldm_parts
    from lohatrain.trainer import train

    pure = _weights(model)
    plain = generate("red circle")
    settings = settings_for(sample_dataset, webui / "Lora", **{
        "name": name, "steps": 2, "learning_rate": 1e-2, "text_encoder_lr": 1e-2, "conv_dim": 2, "conv_alpha": 1,
        **settings})
    result = train(ldm_parts(model), settings)
    assert _weights(model).keys() == pure.keys() and all(torch.equal(v, pure[k]) for k, v in _weights(model).items())
    tensors = load_file(result.file)

    networks.list_available_networks()
    with_loha = generate(f"red circle <lora:{name}:1>")
    assert networks.last_unmatched_keys == [] and [n.name for n in networks.loaded_networks] == [name]
    assert not networks.extra_network_lora.errors
    assert not np.array_equal(pixels(plain), pixels(with_loha))

    expected = copy.deepcopy(model)
    expected.load_state_dict(pure)
    assert host_rules.apply_file(expected, tensors) == []
    applied, wanted = _weights(model), _weights(expected)
    changed = [k for k in pure if not torch.equal(applied[k], pure[k])]
    for key in pure:
        torch.testing.assert_close(applied[key], wanted[key], rtol=1e-5, atol=1e-6, msg=key)

    again = generate("red circle")
    assert np.array_equal(pixels(again), pixels(plain))
    assert all(torch.equal(v, pure[k]) for k, v in _weights(model).items()), "weights must be restored bit-exactly"
    return tensors, changed


def test_loha_trained_on_sdxl_applies_through_the_hosts_sdxl_rules(webui, sample_dataset):
    """A file lohatrain trains on the loaded SDXL model (UNet with conv layers, both text encoders): every key
    lands (lora_unet_ ldm names, lora_te1_ on CLIP-L, lora_te2_ on bigG with the fused attention), the image
    changes, the weights carry what an independent reading of the host's rules adds, and come back exactly."""
    tensors, changed = _trained_file_through_the_host(loaded_sdxl(webui), webui, sample_dataset, "xl_loha")
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}, prefixes
    assert any(".attn.in_proj_weight" in k for k in changed) and any(".attn.out_proj.weight" in k for k in changed)
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.") for k in changed)  # a conv ResBlock


def test_fused_attention_takes_a_loha_only_with_all_four_parts(webui):
    """bigG's attention is one nn.MultiheadAttention: q/k/v/out keys change it only as a complete set (layer 1
    here); layer 0's q/k/v without out is ignored without an error, as in the host."""
    model = loaded_sdxl(webui)
    bigg = model.conditioner.embedders[1].wrapped.model
    g = torch.Generator().manual_seed(0)
    tensors, width = {}, bigg.transformer.width
    for layer, parts in ((0, "qkv"), (1, ("q", "k", "v", "out"))):
        for part in parts:
            key = f"lora_te2_text_model_encoder_layers_{layer}_self_attn_{part}_proj"
            for i in (1, 2):
                tensors[f"{key}.hada_w{i}_a"] = torch.randn(width, 2, generator=g) * 0.3
                tensors[f"{key}.hada_w{i}_b"] = torch.randn(2, width, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(webui / "Lora" / "attn.safetensors"))
    networks.list_available_networks()
    expected = copy.deepcopy(model)
    assert host_rules.apply_file(expected, tensors) == []
    blocks = bigg.transformer.resblocks
    before = [(b.attn.in_proj_weight.detach().clone(), b.attn.out_proj.weight.detach().clone()) for b in blocks[:2]]

    generate("red circle <lora:attn:1>")
    assert networks.last_unmatched_keys == [] and not networks.extra_network_lora.errors
    assert torch.equal(blocks[0].attn.in_proj_weight, before[0][0])
    assert torch.equal(blocks[0].attn.out_proj.weight, before[0][1])
    wanted = expected.conditioner.embedders[1].wrapped.model.transformer.resblocks[1].attn
    torch.testing.assert_close(blocks[1].attn.in_proj_weight, wanted.in_proj_weight)
    torch.testing.assert_close(blocks[1].attn.out_proj.weight, wanted.out_proj.weight)
    assert not torch.equal(blocks[1].attn.in_proj_weight, before[1][0])


def test_run_training_on_the_loaded_sdxl_model_leaves_it_exactly_as_found(webui, sample_dataset, run_job):
    """The adapter's whole job on an SDXL checkpoint in the host: the conditioning through the host's wrappers,
    a preview through the host's txt2img, the file in the Lora folder and listed, the model untouched."""
    from test_engine import model_state, settings_for

    model = loaded_sdxl(webui)
    before = model_state(model)
    wrappers = list(model.conditioner.embedders)
    settings = settings_for(sample_dataset, webui / "unused", name="xl_job", steps=2, text_encoder_lr=1e-3,
                            conv_dim=2, conv_alpha=1, preview_every_steps=2, clip_skip=2)
    shared.opts.sdxl_clip_l_skip = True  # Settings → "Clip skip SDXL": the host applies CLIP skip to CLIP-L
    try:
        result, job = run_job(settings)
    finally:
        shared.opts.sdxl_clip_l_skip = False
    with safe_open(str(result.file), "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "2"
    plain, _ = run_job(dataclasses.replace(settings, name="xl_plain", steps=1, preview_every_steps=0))
    with safe_open(str(plain.file), "pt") as f:
        assert f.metadata()["ss_clip_skip"] == "None"  # by default the host ignores CLIP skip on SDXL
    assert result.status == "done" and result.steps_done == 2 and len(job.losses) == 2
    assert result.file == webui / "Lora" / "xl_job.safetensors" and "xl_job" in networks.available_networks
    assert networks.available_networks["xl_job"].sd_version == networks.SdVersion.SDXL
    assert job.preview and Path(job.preview).is_file()
    assert shared.sd_model is model and list(model.conditioner.embedders) == wrappers
    assert model_state(model) == before
    assert not any(e.is_trainable for e in model.conditioner.embedders)


# --- SD2 --------------------------------------------------------------------------------------------------------

SD2_WIDTH = lohatrain.demo.SD2_TEXT_WIDTH  # the tiny SD2's OpenCLIP width (UNet context_dim)


def loaded_sd2(folder: Path, name: str = "tiny-SD2"):
    placeholder_checkpoint(folder, name)  # "sd2" in the name: the stand-in builds the tiny SD2 (768-v)
    sd_models.list_models()
    sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match(name))
    return shared.sd_model


def test_sd2_checkpoint_loads_as_the_host_loads_it_and_switching_family_builds_a_new_model(webui):
    import zlib

    from lohatrain.demo import build_tiny_sd2
    from lohatrain.text_encoders import OpenCLIPEmbedder
    from modules import sd_hijack, sd_hijack_open_clip

    # the stand-in's config rule: "xl" first, then "sd2" / "v2" in any case, else SD1
    configs = {name: sd_models.find_checkpoint_config({}, sd_models.CheckpointInfo(str(webui / "ckpt" / name)))
               for name in ("a-SD2.ckpt", "sd21-base.ckpt", "x-V2-768.ckpt", "sdxl-v2.ckpt", "base.ckpt")}
    assert configs == {"a-SD2.ckpt": "v2-inference-v.yaml", "sd21-base.ckpt": "v2-inference-v.yaml",
                       "x-V2-768.ckpt": "v2-inference-v.yaml", "sdxl-v2.ckpt": "sd_xl_base.yaml",
                       "base.ckpt": "v1-inference.yaml"}

    sd1 = loaded(webui)
    path = placeholder_checkpoint(webui, "tiny-SD2")
    sd_models.list_models()
    sd2 = sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("tiny-SD2"))
    assert sd2 is shared.sd_model and sd2 is not sd1 and next(sd1.parameters()).device.type == "meta"
    assert sd2.is_sd2 and not (sd2.is_sd1 or sd2.is_sdxl or sd2.is_ssd or sd2.is_sd3)
    assert sd2.model_type == sd_models.ModelType.SD2 and sd2.sd_checkpoint_info.filename == str(path)
    assert sd2.used_config == "v2-inference-v.yaml" != sd1.used_config
    assert sd2.parameterization == "v" and sd2.alphas_cumprod.dtype == torch.float32
    assert sd2.alphas_cumprod.shape == (1000,)

    # the hijack: ldm's OpenCLIP embedder inside the host's wrapper, open_clip's ids, padded with 0
    stage = sd2.cond_stage_model
    assert type(stage) is sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords
    assert isinstance(stage.wrapped, OpenCLIPEmbedder) and (stage.wrapped.layer, stage.wrapped.layer_idx) == (
        "penultimate", 1)
    assert (stage.id_start, stage.id_end, stage.id_pad, stage.return_pooled) == (49406, 49407, 0, False)
    assert stage.comma_token == 267 and stage.legacy_ucg_val is None and not stage.is_trainable
    assert sd2.cond_stage_model_empty_prompt.shape == (1, 77, SD2_WIDTH)
    networks.assign_network_names_to_compvis_modules(sd2)  # (also a model_loaded callback, until one clears them)
    assert "model_transformer_resblocks" in sd2.network_layer_mapping  # how the Lora extension tells SD2
    sd_hijack.model_hijack.undo_hijack(sd2)
    assert sd2.cond_stage_model is stage.wrapped
    sd_models.set_model_type(sd2, {})  # the host decides SD2 on the bare embedder (it has .model)
    assert sd2.is_sd2 and not sd2.is_sd1
    sd_hijack.model_hijack.hijack(sd2)
    assert type(sd2.cond_stage_model) is sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords
    assert sd2.cond_stage_model.wrapped is stage.wrapped

    # the factory's weights (placeholder file), seeded from the file name
    reference = build_tiny_sd2(zlib.crc32(b"tiny-SD2") % 1000).state_dict()
    sd_hijack.model_hijack.undo_hijack(sd2)
    try:
        torch.testing.assert_close(sd2.state_dict(), reference, rtol=0, atol=0)
    finally:
        sd_hijack.model_hijack.hijack(sd2)

    # an SD2 file that holds a state dict (keys cond_stage_model.model.…, as real SD2 checkpoints) fits the
    # loaded SD2: it goes into the same object, the hijack undone around it and redone
    save_file(build_tiny_sd2(1).state_dict(), str(webui / "ckpt" / "other-v2.safetensors"))
    sd_models.list_models()
    assert sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("other-v2")) is None
    assert shared.sd_model is sd2 and sd2.is_sd2 and sd2.sd_checkpoint_info.name == "other-v2.safetensors"
    assert type(sd2.cond_stage_model) is sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords
    torch.testing.assert_close(sd2.model.state_dict(), build_tiny_sd2(1).model.state_dict(), rtol=0, atol=0)

    back = sd_models.reload_model_weights(info=sd_models.get_closet_checkpoint_match("base"))
    assert back is shared.sd_model and back is not sd2 and back.is_sd1 and not back.is_sd2
    assert type(back.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords"


def test_sd2_get_learned_conditioning_follows_the_host(webui):
    """The wrapper gives what ldm's embedder gives for a short prompt (<start> … <end> then 0s, the configured
    penultimate layer through ln_final), encodes longer prompts as 75-token chunks side by side, pads a batch
    with empty chunks, and ignores CLIP skip (as the host does on SD2)."""
    model = loaded_sd2(webui)
    bare = model.cond_stage_model.wrapped
    prompts = ["red circle", "blue square on green"]
    seen = []  # the token batches the wrapper hands to ldm's encode_with_transformer
    encode = bare.encode_with_transformer
    bare.encode_with_transformer = lambda tokens: (seen.append(tokens.clone()), encode(tokens))[1]
    try:
        with torch.no_grad():
            c = model.get_learned_conditioning(prompts)
            assert c.shape == (2, 77, SD2_WIDTH) and len(seen) == 1
            assert torch.equal(seen[0], bare.tokenize(prompts))  # open_clip's tokens, 0-padded
            torch.testing.assert_close(c, bare(prompts), rtol=0, atol=0)

            plain = model.get_learned_conditioning(["red circle"])
            empty = model.get_learned_conditioning([""])
            seen.clear()
            long = model.get_learned_conditioning(["red circle", " ".join(["dot"] * 100)])
            assert long.shape == (2, 154, SD2_WIDTH) and len(seen) == 2  # one call per chunk
            second = seen[1]  # row 0: the short prompt's empty chunk; row 1: <start>, 25 dots, <end>, then 0s
            assert second[0, :2].tolist() == [49406, 49407] and not second[0, 2:].any()
            assert second[1, 0] == 49406 and second[1, 26] == 49407 and not second[1, 27:].any()
            torch.testing.assert_close(long[:1, :77], plain, rtol=0, atol=0)
            torch.testing.assert_close(long[:1, 77:], empty, rtol=0, atol=0)
            torch.testing.assert_close(long[1:, :77], model.get_learned_conditioning([" ".join(["dot"] * 75)]),
                                       rtol=0, atol=0)
            torch.testing.assert_close(long[1:, 77:], model.get_learned_conditioning([" ".join(["dot"] * 25)]),
                                       rtol=0, atol=0)

            shared.opts.CLIP_stop_at_last_layers = 2
            try:
                skipped = model.get_learned_conditioning(["red circle"])
            finally:
                shared.opts.CLIP_stop_at_last_layers = 1
            assert torch.equal(skipped, plain)
    finally:
        del bare.encode_with_transformer


def test_txt2img_on_sd2_is_deterministic_per_seed(webui):
    loaded_sd2(webui)
    p = processing.StableDiffusionProcessingTxt2Img(prompt="red circle", seed=5, steps=STEPS, width=64, height=64,
                                                    do_not_save_grid=True, do_not_save_samples=True)
    first = processing.process_images(p)
    assert first.images[0].size == (64, 64) and "Seed: 5" in first.info
    assert p.c.shape == (1, 77, SD2_WIDTH) and p.uc.shape == (1, 77, SD2_WIDTH)
    assert np.array_equal(pixels(first), pixels(generate("red circle", seed=5)))
    assert not np.array_equal(pixels(first), pixels(generate("red circle", seed=6)))
    assert not np.array_equal(pixels(first), pixels(generate("blue square", seed=5)))


@pytest.mark.parametrize("v_prediction", [True, False])
def test_txt2img_turns_the_models_prediction_into_noise_as_the_hosts_sampler(webui, v_prediction):
    """A model that knows the clean latent x0 predicts, at every step, ldm's own target for it: v = get_v(x0, ε, t)
    (768-v) or ε (512 base), with ε the noise in x_t. The sampler must then denoise to exactly that x0 whatever
    the guidance scale; a v read as noise would not."""
    from lohatrain.demo import build_tiny_sd2

    sd_models.model_factory = lambda info: build_tiny_sd2(3, v_prediction=v_prediction)
    model = loaded_sd2(webui)
    assert model.parameterization == ("v" if v_prediction else "eps")
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []  # the sampler's denoised estimate so far, at each prediction

    def oracle(x_t, t, cond):
        seen.append(shared.state.current_latent)
        a = model.alphas_cumprod.double()[t][:, None, None, None]
        eps = ((x_t.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()
        return model.get_v(x0, eps, t) if v_prediction else eps

    model.apply_model = oracle
    try:
        shared.state.current_latent = None
        result = generate("red circle", seed=5, cfg_scale=7.0)
    finally:
        del model.apply_model
    assert result.images[0].size == (64, 64) and len(seen) == 2 * STEPS  # cond and uncond at each step
    denoised = seen[2::2] + [shared.state.current_latent]  # what each step ended with
    assert len(denoised) == STEPS
    for latent in denoised:
        torch.testing.assert_close(latent, x0, rtol=1e-4, atol=1e-4)


def test_loha_trained_on_sd2_applies_through_the_hosts_sd2_rules(webui, sample_dataset):
    """A file lohatrain trains on the loaded SD2 model (UNet with conv layers, the OpenCLIP text encoder): every
    key lands (diffusers-named lora_unet_, lora_te_ mapped onto OpenCLIP's resblocks with the fused attention),
    the image changes, the weights carry what an independent reading of the host's rules adds, the file is
    listed as SD2, and the weights come back exactly."""
    tensors, changed = _trained_file_through_the_host(loaded_sd2(webui), webui, sample_dataset, "sd2_loha")
    assert {k.split("_")[1] for k in tensors} == {"unet", "te"}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in tensors)
    assert networks.available_networks["sd2_loha"].sd_version == networks.SdVersion.SD2
    text = "cond_stage_model.wrapped.model.transformer.resblocks."
    assert any(k.startswith(text) and k.endswith(".attn.in_proj_weight") for k in changed)
    assert any(k.startswith(text) and k.endswith(".attn.out_proj.weight") for k in changed)
    assert any(k.startswith(text) and ".mlp.c_fc." in k for k in changed)
    assert any(k.startswith(text) and ".mlp.c_proj." in k for k in changed)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.") for k in changed)  # a conv ResBlock
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.proj_in.") for k in changed)  # linear proj


def test_run_training_on_the_loaded_sd2_model_leaves_it_exactly_as_found(webui, sample_dataset, run_job):
    """The adapter's whole job on an SD2 checkpoint in the host: the conditioning through the host's OpenCLIP
    wrapper, a preview through the host's txt2img (v-prediction), the file in the Lora folder and listed as SD2,
    the model untouched."""
    from test_engine import model_state, settings_for

    model = loaded_sd2(webui)
    before = model_state(model)
    wrapper = model.cond_stage_model
    settings = settings_for(sample_dataset, webui / "unused", name="sd2_job", steps=2, text_encoder_lr=1e-3,
                            conv_dim=2, conv_alpha=1, preview_every_steps=2)
    result, job = run_job(settings)
    assert result.status == "done" and result.steps_done == 2 and len(job.losses) == 2
    assert result.file == webui / "Lora" / "sd2_job.safetensors" and "sd2_job" in networks.available_networks
    assert networks.available_networks["sd2_job"].sd_version == networks.SdVersion.SD2
    assert job.preview and Path(job.preview).is_file()
    assert shared.sd_model is model and model.cond_stage_model is wrapper and not wrapper.is_trainable
    assert model_state(model) == before


TYPES = [("locon", False), ("lokr", False), ("lora", True), ("loha", True)]
# Every module type of the host's loader on SD1 (plain LoRA's keys are LoRA+DoRA's less `dora_scale`); on SDXL (other block names, and both text encoders: CLIP-L's and OpenCLIP's fused
# attention, which is SD2's) each kind of key once: LoRA's with DoRA's scales and LoKr's (LoCon's are LoRA's
# on more layers; LoHa's on SD2 and SDXL: the per-family tests above).
CASES = [("sd1", m, d) for m, d in TYPES] + [("sdxl", m, d) for m, d in (("lora", True), ("lokr", False))]


@pytest.mark.parametrize("family,method,dora", CASES, ids=[f"{m}{'+dora' if d else ''}-{f}" for f, m, d in CASES])
def test_every_type_applies_through_the_hosts_loader(webui, sample_dataset, family, method, dora):
    """LoRA, LoCon, LoKr and DoRA files on each family through the stand-in of the host's own module types
    (network_lora.py, network_lokr.py, network.py's DoRA): every key matched, the image changes, the weights are
    what the published formulas give, and come back exactly."""
    model = {"sd1": lambda: loaded(webui), "sd2": lambda: loaded_sd2(webui), "sdxl": lambda: loaded_sdxl(webui)}[family]()
    tensors, changed = _trained_file_through_the_host(
        model, webui, sample_dataset, f"{family}_{method}{'_dora' if dora else ''}", training_method=method,
        dora=dora, lokr_factor=4, conv_dim=0 if method == "lora" else 2)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    expected = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"}, "locon": {"lora_down.weight", "lora_up.weight",
                "alpha"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}}.get(method)
    if expected is not None:
        assert suffixes == expected | ({"dora_scale"} if dora else set())
    else:
        assert {"lokr_w1", "alpha"} <= suffixes and suffixes <= {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}
    conv_changed = any(k.endswith("in_layers.2.weight") for k in changed)
    assert conv_changed == (method != "lora")
