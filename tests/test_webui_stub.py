"""The WebUI stand-in (tests/webui_stub) must behave as the host (v1.10.1) where lohatrain's adapter relies on it."""

import copy
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

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
