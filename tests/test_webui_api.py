"""The REST routes and the host integration, over real HTTP against the page served on the host stand-in."""
from __future__ import annotations

import dataclasses
import sys
import threading

import httpx
import pytest
import torch
from safetensors import safe_open

import webui_app  # noqa: F401  (puts the host stand-in on sys.path)
import networks
from modules import call_queue, processing, shared


import lohatrain.demo
from lohatrain.errors import LohatrainError
from lohatrain.trainer import train

from page import finished, rest_behind_gradio_auth, run_body, wait_until
from runs import model_state, settings_for


def test_train_through_rest_writes_the_lora_and_the_webui_lists_it(webui_server):
    ui = webui_server
    before = model_state(shared.sd_model)
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "rest-loha"))
    assert r.status_code == 200 and r.json()["job_id"]
    status = wait_until(ui, finished)
    assert status["state"] == "done", status["message"]
    assert status["step"] == status["total"] == 4 and len(status["losses"]) == 4
    assert (ui.lora_dir / "rest-loha.safetensors").is_file() and status["file_name"] == "rest-loha.safetensors"
    assert "rest-loha" in networks.available_networks  # the host's Lora list was refreshed
    with safe_open(ui.lora_dir / "rest-loha.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["ss_sd_model_name"] == "tiny-sd1.safetensors"
    assert meta["ss_sd_model_hash"] == shared.sd_model.sd_checkpoint_info.sha256
    assert meta["ss_clip_skip"] == "1"  # the host's CLIP-skip setting
    assert model_state(shared.sd_model) == before


def test_second_training_is_refused_with_409_while_one_runs(webui_server):
    ui = webui_server
    with call_queue.queue_lock:  # a txt2img is running: the training waits for the GPU queue
        assert httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "first", steps=2)).status_code == 200
        status = httpx.get(f"{ui.url}/lohatrain/v1/status").json()
        assert status["state"] == "running" and status["step"] == 0
        second = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "second"))
        assert second.status_code == 409 and "already running" in second.json()["detail"][0]
    assert wait_until(ui, finished)["state"] == "done"
    assert not (ui.lora_dir / "second.safetensors").exists()


def test_every_bad_value_is_listed_with_422(webui_server):
    ui = webui_server
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(
        ui, "../escape", steps=0, learning_rate=-1, train_dtype="fp8", learnin_rate=1))
    assert r.status_code == 422
    assert r.json()["detail"] == ["unknown setting 'learnin_rate'"]
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(
        ui, "../escape", steps=0, learning_rate=-1, train_dtype="fp8"))
    problems = r.json()["detail"]
    assert r.status_code == 422 and len(problems) == 4
    assert [p.split()[0] for p in problems] == ["name", "learning_rate", "steps", "train_dtype"]
    assert not list(ui.root.rglob("escape*"))


def test_an_unknown_optimizer_a_missing_package_or_a_wrong_argument_is_a_422(webui_server, monkeypatch):
    ui = webui_server
    before = httpx.get(f"{ui.url}/lohatrain/v1/status").json()
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "opt", optimizer="sgd",
                                                                optimizer_args="momentum"))
    assert r.status_code == 422 and r.json()["detail"] == [
        "optimizer must be one of adamw, adamw8bit, prodigy, lion, adafactor, not 'sgd'",
        "optimizer_args: 'momentum' must be name=value, e.g. weight_decay=0.05"]
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "opt", optimizer="lion", optimizer_args="betas=0.9"))
    assert r.status_code == 422 and r.json()["detail"] == [
        "optimizer_args: betas must be 2 numbers separated by commas, not 0.9"]
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # as if its installation had failed
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "opt", optimizer="prodigy"))
    assert r.status_code == 422 and r.json()["detail"][0].startswith(
        "the optimizer prodigy needs the Python package prodigyopt, which is not installed: restart the WebUI")
    assert httpx.get(f"{ui.url}/lohatrain/v1/status").json().get("job_id") == before.get("job_id")
    assert not list(ui.lora_dir.glob("opt*"))


def test_a_dataset_problem_is_refused_before_a_job_starts(webui_server, tmp_path):
    ui = webui_server
    before = httpx.get(f"{ui.url}/lohatrain/v1/status").json()
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "no-images", dataset_dir=str(tmp_path)))
    assert r.status_code == 422 and "No images found" in r.json()["detail"][0]
    assert httpx.get(f"{ui.url}/lohatrain/v1/status").json().get("job_id") == before.get("job_id")
    assert not (ui.lora_dir / "no-images.safetensors").exists()


def test_a_dataset_that_breaks_after_the_start_ends_the_job_with_its_message(webui_server, tmp_path):
    """Checked once, at the start; then the job waits for the GPU: an image removed meanwhile ends it with a
    message naming the image, and nothing is written."""
    ui = webui_server
    lohatrain.demo.make_sample_dataset(tmp_path / "images")
    with call_queue.queue_lock:  # a generation is running: the job waits
        r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "broken-later",
                                                                    dataset_dir=str(tmp_path / "images")))
        assert r.status_code == 200
        removed = sorted((tmp_path / "images").glob("*.png"))[0]
        removed.unlink()
    status = wait_until(ui, finished)
    assert status["state"] == "error" and f"{removed.name} cannot be read" in status["message"]
    assert not (ui.lora_dir / "broken-later.safetensors").exists()


def test_interrupt_route_stops_within_a_step_and_keeps_what_was_trained(webui_server):
    ui = webui_server
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "stopped", steps=5000))
    wait_until(ui, lambda s: s["step"] >= 2)
    assert httpx.post(f"{ui.url}/lohatrain/v1/interrupt").json() == {"interrupted": True}
    status = wait_until(ui, finished)
    assert status["state"] == "interrupted" and status["step"] < 5000
    with safe_open(ui.lora_dir / "stopped.safetensors", "pt") as f:
        assert f.metadata()["ss_steps"] == str(status["step"])
    assert httpx.post(f"{ui.url}/lohatrain/v1/interrupt").json() == {"interrupted": False}


def test_the_hosts_interrupt_button_stops_training(webui_server):
    ui = webui_server
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "host-stopped", steps=5000))
    wait_until(ui, lambda s: s["step"] >= 1)
    shared.state.interrupt()
    assert wait_until(ui, finished)["state"] == "interrupted"
    assert not shared.state.interrupted  # left clean for the next txt2img


def test_txt2img_waits_for_the_training_to_finish(webui_server):
    ui = webui_server
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "queued", steps=6))
    wait_until(ui, lambda s: s["step"] >= 1)
    seen = {}

    def txt2img():
        with call_queue.queue_lock:
            seen["file_existed"] = (ui.lora_dir / "queued.safetensors").exists()
            seen["images"] = processing.process_images(processing.StableDiffusionProcessingTxt2Img(
                prompt="<lora:queued:1> blue circle", steps=3, width=64, height=64, seed=5)).images

    thread = threading.Thread(target=txt2img)
    thread.start()
    thread.join(timeout=180)
    assert seen["file_existed"]  # the generation started only once training had written its file
    assert len(seen["images"]) == 1 and "queued" in [n.name for n in networks.loaded_networks]


def test_a_lora_the_user_had_applied_is_taken_off_and_can_be_applied_again(webui_server):
    ui = webui_server
    # saved in fp32: the host applies a file in its own dtype, and CPU torch 2.1.2 has no fp16 matmul
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "style", steps=3, save_dtype="fp32"))
    assert wait_until(ui, finished)["state"] == "done"
    pure = {k: v.clone() for k, v in shared.sd_model.state_dict().items()}

    def generate(prompt):
        with call_queue.queue_lock:
            return processing.process_images(processing.StableDiffusionProcessingTxt2Img(
                prompt=prompt, steps=3, width=64, height=64, seed=5)).images[0]

    with_lora = generate("<lora:style:1> blue circle")
    changed = [k for k, v in shared.sd_model.state_dict().items() if not torch.equal(v, pure[k])]
    assert changed  # the host merged the LoHa into the weights
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "after-style", steps=2))
    assert wait_until(ui, finished)["state"] == "done"
    assert all(torch.equal(v, pure[k]) for k, v in shared.sd_model.state_dict().items())  # trained on pure
    assert generate("<lora:style:1> blue circle").tobytes() == with_lora.tobytes()  # applies again
    generate("blue circle")  # and comes off again, as in the host: later tests start from the pure model
    assert all(torch.equal(v, pure[k]) for k, v in shared.sd_model.state_dict().items())


def test_the_pages_logged_in_browser_may_call_the_routes_behind_gradio_auth(webui_server, monkeypatch):
    rest_behind_gradio_auth(webui_server, monkeypatch)


def test_presets_route(webui_server):
    presets = httpx.get(f"{webui_server.url}/lohatrain/v1/presets").json()
    assert list(presets) == ["small", "medium", "high", "highest"]
    assert presets["highest"]["dim"] == 32 and presets["small"]["file_mb"] < presets["highest"]["file_mb"]


# An estimate runs the model's step on fake tensors: seconds, or minutes on a loaded 2-core machine, and more
# when it also estimates the changes that would fit (a bound, not a timing).
ESTIMATE_S = 900


def test_the_preflight_route_answers_the_memory_estimate_or_the_problems(webui_server):
    ui = webui_server
    r = httpx.post(f"{ui.url}/lohatrain/v1/preflight", json=run_body(ui, "estimated"), timeout=ESTIMATE_S)
    assert r.status_code == 200
    est = r.json()
    assert est["message"].startswith("needs ≈") and "GB of memory (model" in est["message"]
    assert est["need_bytes"] == sum(est["parts_bytes"].values()) > 0
    assert est["device"] == "cpu" and est["fits"] is None and est["refusal"] is None  # no GPU: reported only
    r = httpx.post(f"{ui.url}/lohatrain/v1/preflight", json=run_body(ui, "estimated", steps=0, dataset_dir=""),
                   timeout=ESTIMATE_S)
    assert r.status_code == 422 and [p.split()[0] for p in r.json()["detail"]] == ["dataset_dir:", "steps"]
    assert not (ui.lora_dir / "estimated.safetensors").exists()


def test_a_run_that_does_not_fit_the_gpu_is_refused_unless_the_user_insists(webui_server, monkeypatch):
    """The card's free memory is the one thing this CPU machine lacks: it is set between what the run needs with
    and without gradient checkpointing."""
    from lohatrain import memory

    ui = webui_server
    needs = [httpx.post(f"{ui.url}/lohatrain/v1/preflight", timeout=ESTIMATE_S, json=run_body(
        ui, "too-big", gradient_checkpointing=checkpointing)).json()["need_bytes"] for checkpointing in (True, False)]
    monkeypatch.setattr(memory, "available_bytes", lambda parts: sum(needs) // 2)
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "too-big"), timeout=ESTIMATE_S)
    assert r.status_code == 422
    refusal = r.json()["detail"][0]
    assert "To fit: gradient checkpointing on" in refusal and "ignore_memory_estimate" in refusal
    assert not (ui.lora_dir / "too-big.safetensors").exists()
    est = httpx.post(f"{ui.url}/lohatrain/v1/preflight", json=run_body(ui, "too-big"), timeout=ESTIMATE_S).json()
    assert est["fits"] is False and est["refusal"] == refusal
    assert est["fit"]["fits"] is True and est["fit"]["settings"] == {"gradient_checkpointing": True}
    assert est["fit"]["steps"] == [{"label": "gradient checkpointing on", "settings": {"gradient_checkpointing": True},
                                    "need": needs[0], "host_setting": None}]

    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "too-big", ignore_memory_estimate=True),
                   timeout=ESTIMATE_S)
    assert r.status_code == 200
    assert wait_until(ui, finished)["state"] == "done"
    assert (ui.lora_dir / "too-big.safetensors").is_file()


def test_fit_my_card_changes_the_forms_settings_until_the_run_fits(webui_server, monkeypatch):
    """The tab's Fit my card (actions.fit_my_card with the form's fields): on a card whose free memory is what the
    run needs with checkpointing at half the batch, the form gets both, says so, and Train then starts."""
    from lohatrain import memory
    from lohatrain.webui import actions, api, ui as tab

    ui = webui_server
    # the 8-bit optimizer left out, as on a card bitsandbytes has no kernels for (here it depends on its version)
    monkeypatch.setattr(actions, "_why_no_8bit", lambda device: "no 8-bit kernels for it")
    form = api._settings_of(run_body(ui, "fitted", batch_size=4))
    unchanged, text = actions.fit_my_card(form, "tab", frozenset(tab.FIELDS))
    assert unchanged == form and text.startswith("There is no GPU here, so nothing to fit: the run needs ≈")
    free = actions.memory_estimate(dataclasses.replace(form, gradient_checkpointing=True, batch_size=2),
                                   "tab").need
    monkeypatch.setattr(memory, "available_bytes", lambda parts: free)
    with pytest.raises(LohatrainError, match="As it is, it would run out of GPU memory"):
        actions.preflight(form, "tab")

    fitted, text = actions.fit_my_card(form, "tab", frozenset(tab.FIELDS))
    assert dataclasses.asdict(fitted) == {**dataclasses.asdict(form), "gradient_checkpointing": True, "batch_size": 2}
    lines = text.splitlines()
    assert lines[0].startswith("Fit my card: the run needs ≈")
    assert "To fit: gradient checkpointing on (≈ " in lines[0]
    assert f"batch size 2 (≈ {free / memory.GB:.2f} GB)." in lines[0]
    assert lines[1] == "Changed in the form: gradient_checkpointing → True, batch_size → 2."
    actions.preflight(fitted, "tab")  # Train is no longer refused
    again, text = actions.fit_my_card(fitted, "tab", frozenset(tab.FIELDS))
    assert again == fitted and text.startswith("It fits as it is: the run needs ≈")


@pytest.mark.parametrize("flag", ["lowvram", "medvram"])
def test_low_memory_modes_are_refused_with_the_reason(webui_server, monkeypatch, flag):
    monkeypatch.setattr(shared.cmd_opts, flag, True)
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "lowmem"))
    assert r.status_code == 422 and "--lowvram or --medvram" in r.json()["detail"][0]
    assert not (webui_server.lora_dir / "lowmem.safetensors").exists()


def test_medvram_sdxl_is_refused_only_while_an_sdxl_model_is_loaded(webui_server, monkeypatch):
    from lohatrain import hosts
    from lohatrain.demo_sdxl import build_tiny_sdxl
    from lohatrain.errors import LohatrainError

    monkeypatch.setattr(shared.cmd_opts, "medvram_sdxl", True)
    hosts.current().check_memory_mode()  # an SD1 model: the host does not swap it under --medvram-sdxl
    monkeypatch.setattr(shared, "sd_model", build_tiny_sdxl(0))
    with pytest.raises(LohatrainError, match="--medvram-sdxl with an SDXL model loaded"):
        hosts.current().check_memory_mode()


def test_a_checkpoint_that_cannot_be_trained_is_refused_before_a_job_starts(webui_server, monkeypatch):
    before = httpx.get(f"{webui_server.url}/lohatrain/v1/status").json()
    monkeypatch.setattr(shared.sd_model.model.diffusion_model, "in_channels", 9)  # as an inpainting checkpoint
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "inpaint"))
    assert r.status_code == 422 and "it is an inpainting checkpoint" in r.json()["detail"][0]
    assert httpx.get(f"{webui_server.url}/lohatrain/v1/status").json() == before
    assert not (webui_server.lora_dir / "inpaint.safetensors").exists()


def test_captions_go_through_the_hosts_conditioning_with_the_runs_clip_skip_and_no_emphasis(webui_server,
                                                                                            monkeypatch):
    from lohatrain import hosts

    model = shared.sd_model
    seen = []
    real = model.get_learned_conditioning

    elsewhere = []

    def recording(prompts):
        seen.append((shared.opts.emphasis, shared.opts.CLIP_stop_at_last_layers))
        # what any other request (another thread) reads meanwhile, and what a Settings save would write
        reader = threading.Thread(target=lambda: elsewhere.append(
            (shared.opts.emphasis, shared.opts.CLIP_stop_at_last_layers, dict(shared.opts.data))))
        reader.start()
        reader.join()
        return real(prompts)

    monkeypatch.setattr(model, "get_learned_conditioning", recording)
    data_before = dict(shared.opts.data)
    parts = hosts.current().parts()
    skip2 = parts.prompt_encoder(2)(["(red:1.5) circle"])
    host_default = parts.prompt_encoder(None)(["(red:1.5) circle"])
    # The host parses (word:1.2) and BREAK only when emphasis is not "None"; CLIP skip is its option.
    assert seen == [("None", 2), ("None", 1)]
    assert [(e, c) for e, c, _ in elsewhere] == [("Original", 1)] * 2
    assert all((data.get("emphasis"), data.get("CLIP_stop_at_last_layers")) == (data_before.get("emphasis"),
               data_before.get("CLIP_stop_at_last_layers")) for _, _, data in elsewhere)
    assert (shared.opts.emphasis, shared.opts.CLIP_stop_at_last_layers) == ("Original", 1)  # restored
    assert not torch.equal(skip2, host_default)  # the host's wrapper really used the other layer


def test_a_caption_past_75_tokens_leaves_the_others_at_their_own_single_chunk(webui_server, tmp_path):
    """The host pads every caption of a conditioning pass to the longest one's chunk count: with one caption of
    100 words among short ones, that image trains with its two chunks and every other with its one, each as its
    caption gives it encoded alone (extra padding keys would change what the UNet attends to)."""
    from lohatrain import hosts

    model = shared.sd_model
    dataset = lohatrain.demo.make_sample_dataset(tmp_path / "dataset")
    long_caption = " ".join(["dot"] * 100)
    sorted(dataset.glob("*.txt"))[0].write_text(long_caption)
    contexts = []
    hook = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs["context"].detach().clone()), with_kwargs=True)
    parts = hosts.current().parts()
    encode = parts.prompt_encoder(None)
    try:
        train(parts, settings_for(dataset, tmp_path / "out", steps=8, batch_size=1))
    finally:
        hook.remove()
    with torch.no_grad():
        alone = {c: encode([c]) for c in (p.read_text().strip() for p in dataset.glob("*.txt"))}
    assert alone[long_caption].shape[1] == 154 and {c.shape[1] for k, c in alone.items() if k != long_caption} == {77}
    trained = []
    for context in contexts:
        trained += [k for k, c in alone.items() if c.shape == context.shape
                    and torch.allclose(c, context, rtol=1e-5, atol=1e-6)]
    assert sorted(trained) == sorted(alone)  # one epoch: each image once, with its own caption's encoding


def test_shared_state_drives_the_hosts_progress_bar(webui_server):
    ui = webui_server
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "progress", steps=5000))
    status = wait_until(ui, lambda s: s["step"] >= 2)
    assert shared.state.job == "lohatrain" and shared.state.sampling_steps == 5000
    assert 1 <= shared.state.sampling_step <= 5000 and "LoRA training: step" in shared.state.textinfo
    httpx.post(f"{ui.url}/lohatrain/v1/interrupt")
    assert wait_until(ui, finished)["state"] == "interrupted" and status["step"] >= 2
    assert shared.state.job == ""


def test_files_go_into_the_configured_lora_sub_folder(webui_server, monkeypatch):
    ui = webui_server
    monkeypatch.setitem(shared.opts.data, "lohatrain_lora_subfolder", "trained")
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "in-sub", steps=1))
    assert wait_until(ui, finished)["state"] == "done"
    assert (ui.lora_dir / "trained" / "in-sub.safetensors").is_file()
    assert "in-sub" in networks.available_networks
    monkeypatch.setitem(shared.opts.data, "lohatrain_lora_subfolder", "../outside")
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "escaped", steps=1))
    assert r.status_code == 422 and "plain relative folder" in r.json()["detail"][0]



def test_the_lora_list_is_refreshed_under_the_gpu_lock(webui_server, monkeypatch):
    """The host rebuilds its Lora list in place: a generation reading it meanwhile would see it half-built."""
    seen = []
    real = networks.list_available_networks

    def recording():
        seen.append(call_queue.queue_lock.locked())
        return real()

    monkeypatch.setattr(networks, "list_available_networks", recording)
    httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=run_body(webui_server, "listed", steps=1))
    assert wait_until(webui_server, finished)["state"] == "done"
    assert seen == [True]
    assert "listed" in networks.available_networks


def test_a_stopped_run_is_listed_and_resumes_through_rest_to_the_uninterrupted_file(webui_server, monkeypatch):
    """Interrupted whenever the Interrupt lands, then resumed: the same bytes as a run that never stopped."""
    ui = webui_server
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    body = run_body(ui, "rest-resume", steps=12, flip_aug=True)
    httpx.post(f"{ui.url}/lohatrain/v1/train", json=body)
    assert wait_until(ui, finished)["state"] == "done"
    whole = (ui.lora_dir / "rest-resume.safetensors").read_bytes()

    httpx.post(f"{ui.url}/lohatrain/v1/train", json=body)
    wait_until(ui, lambda s: s["step"] >= 1)
    httpx.post(f"{ui.url}/lohatrain/v1/interrupt")
    stopped = wait_until(ui, finished)
    assert stopped["state"] == "interrupted" and "resumed" in stopped["message"]
    runs = httpx.get(f"{ui.url}/lohatrain/v1/runs").json()["runs"]
    listed = next(r for r in runs if r["name"] == "rest-resume")
    assert listed["step"] == stopped["step"] and listed["total"] == 12 and listed["model"] == "tiny-sd1.safetensors"
    assert "rest-resume" in networks.available_networks and not any(
        "lohatrain-state" in n for n in networks.available_networks)  # the state is no Lora

    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json={"resume": "rest-resume"})
    assert r.status_code == 200, r.text
    status = wait_until(ui, finished)
    assert status["state"] == "done" and status["step"] == 12, status["message"]
    assert (ui.lora_dir / "rest-resume.safetensors").read_bytes() == whole
    assert "rest-resume" not in [r["name"] for r in httpx.get(f"{ui.url}/lohatrain/v1/runs").json()["runs"]]


@pytest.mark.parametrize("body,message", [
    ({"resume": "../../etc"}, "must be a plain file name"),
    ({"resume": "never-trained"}, "no saved state never-trained.lohatrain-state"),
    ({"resume": "x", "learning_rate": 1.0}, "'learning_rate' cannot be given with resume"),
    ({"resume": "x", "steps": "many"}, "steps must be a whole number"),
])
def test_a_resume_that_cannot_start_is_refused_with_its_reason(webui_server, body, message):
    before = httpx.get(f"{webui_server.url}/lohatrain/v1/status").json()
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=body)
    assert r.status_code == 422 and message in " ".join(r.json()["detail"])
    assert httpx.get(f"{webui_server.url}/lohatrain/v1/status").json().get("job_id") == before.get("job_id")


def test_the_dataset_doctor_route_answers_the_report(webui_server, tmp_path):
    url = f"{webui_server.url}/lohatrain/v1/dataset/check"
    body = {"dataset_dir": str(webui_server.root / "dataset"), "caption_mode": "txt", "resolution": 64, "batch_size": 2}
    report = httpx.post(url, json=body).json()
    assert report["images"] == 8 and report["problems"] == [] and report["suggested_steps"] == 400
    lohatrain.demo.make_sample_dataset(tmp_path / "copy")
    (tmp_path / "copy" / "sample_03.txt").unlink()
    report = httpx.post(url, json={**body, "dataset_dir": str(tmp_path / "copy")}).json()
    assert report["problems"] == [{"file": "sample_03.png", "kind": "missing_caption", "detail": "has no sample_03.txt",
                                   "message": "sample_03.png has no sample_03.txt: TXT captions need one beside each "
                                              "image; write it, caption the folder with the WebUI's taggers, or "
                                              "choose another caption mode"}]
    r = httpx.post(url, json={**body, "resolution": "big", "colour": 1})
    assert r.status_code == 422 and r.json()["detail"] == ["unknown field 'colour'", "resolution must be a whole number"]
    r = httpx.post(url, json={**body, "dataset_dir": str(tmp_path / "nowhere")})
    assert r.status_code == 422 and "does not exist" in r.json()["detail"][0]


def test_left_out_settings_follow_the_given_resolution_and_the_cpu(webui_server):
    """Bucket sides left out follow the resolution given (not the family's 512 or 1024 px ones), and on a WebUI
    that computes on the CPU the train format is fp32 (fp16 is emulated there, about twice as slow)."""
    body = run_body(webui_server, "follows", steps=1, resolution=128)
    for key in ("bucket_min_side", "bucket_max_side", "train_dtype"):
        del body[key]
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=body)
    assert r.status_code == 200, r.text
    assert wait_until(webui_server, finished)["state"] == "done"
    with safe_open(webui_server.lora_dir / "follows.safetensors", "pt") as f:
        meta = f.metadata()
    settings = __import__("json").loads(meta["lohatrain_settings"])
    assert (settings["bucket_min_side"], settings["bucket_max_side"]) == (64, 256)
    assert meta["ss_mixed_precision"] == "fp32"


def test_the_grid_route_renders_the_saved_steps_and_says_what_is_wrong(webui_server):
    ui = webui_server
    r = httpx.post(f"{ui.url}/lohatrain/v1/train", json=run_body(ui, "rest-grid", save_every_steps=2, preview_steps=2))
    assert r.status_code == 200 and wait_until(ui, finished)["state"] == "done"
    r = httpx.post(f"{ui.url}/lohatrain/v1/grid", json={"name": "rest-grid", "strengths": [1], "seed": 3,
                                                        "prompts": ["red circle"]}, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["files"] == ["rest-grid.grid.png"] and answer["columns"] == ["No LoRA", "Step 2", "Step 4"]
    assert answer["rows"] == [1.0] and answer["prompts"] == ["red circle"]
    assert __import__("base64").b64decode(answer["images"][0]) == (ui.lora_dir / "rest-grid.grid.png").read_bytes()
    for body, message in [({}, "name (the trained file's name) is required"), ({"name": 5}, "name has the wrong type"),
                          ({"name": "rest-grid", "size": 2}, "unknown field 'size'"),
                          ({"name": "nothing-here"}, "no trained file named nothing-here")]:
        r = httpx.post(f"{ui.url}/lohatrain/v1/grid", json=body)
        assert r.status_code == 422 and message in " ".join(r.json()["detail"]), (body, r.text)


def test_an_unknown_preview_sampler_is_refused_with_the_webuis_list(webui_server):
    body = run_body(webui_server, "bad-sampler", preview_every_steps=2, preview_sampler="Nope")
    r = httpx.post(f"{webui_server.url}/lohatrain/v1/train", json=body)
    assert r.status_code == 422 and "'Nope' is not one of the WebUI's samplers: DPM++ 2M" in r.json()["detail"][0]
