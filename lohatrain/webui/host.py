"""The one place lohatrain talks to the WebUI (`modules`, and the built-in Lora extension's `networks`).

Everything host-specific is here: the loaded model and its name, CLIP skip and emphasis options, the Lora
folder, the GPU queue, `shared.state` (progress bar, Interrupt, live preview), previews through the host's
own txt2img processing, and refreshing the Lora list. The tab and the REST routes call these functions and
never import `modules` themselves.

In Forge 2 (decided once, at import: `lohatrain.forge.is_forge_host`) the few functions that differ there branch
on `_forge` (lohatrain/forge/host.py, which imports no `modules`): the lazily loaded checkpoint, choosing a
checkpoint, the text path's CLIP skip, LoRAs and memory around a run and around the grid. Everything else is the
same `modules` API. In reForge `main` (`lohatrain.reforge.is_reforge_host`) the A1111 path runs, with LoRAs and
memory around a run handled by lohatrain.reforge through reForge's memory manager (`_reforge_memory`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import gc
import io
import sys
import threading
from hmac import compare_digest
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from modules import call_queue, devices, processing, scripts, sd_models, sd_samplers, shared

from .. import captions
from .. import dataset as ds
from .. import grid
from ..errors import LohatrainError
from ..forge import is_forge_host
from ..reforge import REFORGE_NOTES, is_reforge_host
from ..reforge import loras_kept as reforge_loras_kept
from ..reforge import unet_session as reforge_unet_session
from ..preflight import preflight as engine_preflight
from ..families import detect
from ..jobs import Job
from ..output import STATE_SUFFIX, write_atomically
from ..run_state import SavedRun, list_resumable, read_state
from ..settings import TrainSettings, check_file_name
from ..trainer import Progress, TrainResult, train

EXTENSION_DIR = Path(__file__).resolve().parents[2]
SETTINGS_SECTION = ("lohatrain", "LoRA training")

if is_forge_host():
    from ..forge import host as _forge
else:
    _forge = None
if not _forge and is_reforge_host():
    from ldm_patched.modules import model_management as _reforge_memory
else:
    _reforge_memory = None


def register_settings() -> None:
    """The extension's section in the WebUI's Settings tab."""
    shared.opts.add_option("lohatrain_lora_subfolder", shared.OptionInfo(
        "", "Sub-folder of the Lora folder for trained files (empty: the Lora folder itself)",
        section=SETTINGS_SECTION))
    shared.opts.add_option("lohatrain_previews", shared.OptionInfo(
        True, "Make preview images while training (when 'preview every N steps' is set)", section=SETTINGS_SECTION))
    # restrict_api: the WebUI's /sdapi/v1/options cannot change these two (the host's own rule for options
    # that would open the machine to the network).
    shared.opts.add_option("lohatrain_allow_any_path", shared.OptionInfo(
        False, "Allow dataset folders outside the WebUI folder even when the WebUI listens on the network "
        "without a password", section=SETTINGS_SECTION, restrict_api=True))
    shared.opts.add_option("lohatrain_allow_unauthenticated_api", shared.OptionInfo(
        False, "Answer lohatrain's REST API (/lohatrain/v1/*) when the WebUI listens on the network without "
        "--api-auth", section=SETTINGS_SECTION, restrict_api=True))


def model_summary() -> dict:
    """What the tab shows about the loaded checkpoint."""
    m = shared.sd_model
    if _forge and not _forge.is_loaded(m):
        return _forge.not_loaded_summary(shared.opts.data.get("sd_model_checkpoint", "") or "")
    info = getattr(m, "sd_checkpoint_info", None)
    try:
        found = detect(m)
        family, family_name, problem = found.label, found.name, None
    except LohatrainError as e:
        family, family_name, problem = None, None, str(e)
    return {"name": getattr(info, "name_for_extra", None) or getattr(info, "name", "unknown"),
            "title": getattr(info, "title", ""), "hash": getattr(info, "shorthash", None) or "",
            "family": family, "family_name": family_name, "problem": problem}


def host_notes() -> tuple[str, ...]:
    """What the tab offers that this host cannot do, and why."""
    return _forge.NOTES if _forge else REFORGE_NOTES if _reforge_memory else ()


def loaded_family() -> str:
    """The loaded model's family name ("sd1", "sd2", "sdxl"), for defaults; SD1's when it cannot be trained
    (training refuses it anyway, with the reason)."""
    return model_summary()["family_name"] or "sd1"


def checkpoint_titles() -> list[str]:
    sd_models.list_models()
    return list(sd_models.checkpoint_tiles())


def load_checkpoint(title: str) -> dict:
    """Switch the WebUI to another checkpoint through its own loader (waits for the GPU queue)."""
    info = sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise LohatrainError(f"checkpoint {title!r} was not found; press refresh in the WebUI")
    with call_queue.queue_lock:  # reload_model_weights records the choice in opts itself
        if _forge:  # Forge's reload_model_weights does nothing: its own choice, then its (lazy) loader
            from modules_forge import main_entry
            main_entry.checkpoint_change(title)
            sd_models.forge_model_reload()
        else:
            sd_models.reload_model_weights(info=info)
    return model_summary()


def host_clip_skip() -> int:
    return int(shared.opts.CLIP_stop_at_last_layers)


def lora_dir() -> Path:
    sub = str(getattr(shared.opts, "lohatrain_lora_subfolder", "") or "").strip()
    base = Path(shared.cmd_opts.lora_dir)
    if sub:
        sub_path = Path(sub)
        if sub_path.is_absolute() or ".." in sub_path.parts:
            raise LohatrainError(f"the Lora sub-folder setting {sub!r} must be a plain relative folder name")
        return base / sub_path
    return base


def listens_beyond_this_computer() -> bool:
    o = shared.cmd_opts
    return bool(getattr(o, "listen", False) or getattr(o, "share", False) or getattr(o, "ngrok", None)
                or getattr(o, "server_name", None))


def is_exposed(via: str) -> bool:
    """Reachable from the network without a password for this entry: the tab is protected by --gradio-auth,
    the REST routes only by --api-auth (the WebUI's --gradio-auth covers Gradio's own routes alone)."""
    password = getattr(shared.cmd_opts, "gradio_auth" if via == "tab" else "api_auth", None)
    return listens_beyond_this_computer() and not password


def api_refusal(credentials: tuple[str, str] | None, logged_in_to_tab: bool) -> tuple[int, str] | None:
    """Why a REST call is refused, as (HTTP status, message), or None to answer it.

    With --api-auth: the WebUI's own rule (modules/api/api.py, Api.auth): HTTP Basic, any of its
    `user:password` pairs, compared in constant time. Without it, on a WebUI reachable from the network: refused
    unless an administrator allowed it in Settings. The tab's own page behind --gradio-auth passes by its login.
    """
    api_auth = getattr(shared.cmd_opts, "api_auth", None)
    if logged_in_to_tab:
        return None
    if api_auth:
        pairs = dict(pair.split(":", 1) for pair in api_auth.split(",") if ":" in pair)
        if credentials is not None and credentials[0] in pairs and compare_digest(credentials[1], pairs[credentials[0]]):
            return None
        return 401, "Incorrect username or password"
    if listens_beyond_this_computer() and not getattr(shared.opts, "lohatrain_allow_unauthenticated_api", False):
        return 403, ("the WebUI is reachable from the network without --api-auth, so lohatrain's REST API is off: "
                     "restart the WebUI with --api-auth user:password (or allow it in Settings → LoHa training)")
    return None


def check_dataset_path(folder: str, via: str) -> None:
    """The path rule for every entry that reads a user-given folder (train, Check dataset): the folder is
    resolved exactly as the reader opens it (`~`, relative paths and symlinks included) before it is compared."""
    if not is_exposed(via) or getattr(shared.opts, "lohatrain_allow_any_path", False):
        return
    root = Path(getattr(shared, "data_path", None) or EXTENSION_DIR.parents[1]).resolve()
    dataset = ds.resolve_folder(folder)
    if root not in (dataset, *dataset.parents):
        raise LohatrainError(
            f"the WebUI is reachable from the network without a password, so the dataset folder must be inside "
            f"the WebUI's folder (an administrator can allow other folders in Settings → LoHa training)")


def preflight(settings: TrainSettings, via: str, resuming: bool = False) -> None:
    """Everything that can refuse a run before it starts (tab, REST, and the job itself): the path rule, the
    memory flags, the preview sampler, then the engine's own preflight on the loaded model (family, precision,
    torch, output)."""
    check_dataset_path(settings.dataset_dir, via)
    check_memory_mode()
    if settings.preview_every_steps:
        check_sampler(settings.preview_sampler)
    if _forge and not _forge.is_loaded(shared.sd_model):
        settings.validate()  # the rest once the run has loaded the checkpoint (run_training)
        return
    engine_preflight(shared.sd_model, settings, lora_dir(), resuming)


def sampler_names() -> list[str]:
    """The samplers the WebUI's txt2img offers (Settings → hide_samplers left out)."""
    return sd_samplers.visible_sampler_names()


def check_sampler(name: str) -> None:
    if sd_samplers.find_sampler_config(name) is None:
        raise LohatrainError(f"preview_sampler {name!r} is not one of the WebUI's samplers: "
                             f"{', '.join(sampler_names())}")


def device_defaults() -> dict:
    """Defaults that depend on where the WebUI computes: on the CPU (`--use-cpu all`) fp32 trains about twice
    as fast as fp16, which the CPU emulates."""
    return {"train_dtype": "fp32"} if torch.device(devices.device).type == "cpu" else {}


def resumable_runs() -> list[dict]:
    """The stopped runs in the Lora folder, newest first (lohatrain.run_state.list_resumable)."""
    return list_resumable(lora_dir())


def resume_settings(name, steps: int | None = None) -> tuple[TrainSettings, SavedRun]:
    """A stopped run's own settings (into today's Lora folder; `steps` may extend it) and its saved state."""
    problem = check_file_name(name)
    if problem:
        raise LohatrainError(problem.replace("name", "resume: the run's name", 1))
    saved = read_state(lora_dir() / f"{name}{STATE_SUFFIX}")
    settings = dataclasses.replace(saved.record.settings, output_dir=str(lora_dir()),
                                   **({"steps": steps} if steps else {}))
    settings.validate()
    return settings, saved


def check_memory_mode() -> None:
    o = shared.cmd_opts
    # --medvram-sdxl is --medvram for SDXL models only (the host's lowvram.is_needed: a model with a conditioner)
    sdxl_medvram = getattr(o, "medvram_sdxl", False) and hasattr(shared.sd_model, "conditioner")
    if getattr(o, "lowvram", False) or getattr(o, "medvram", False) or sdxl_medvram:
        raise LohatrainError(
            "lohatrain cannot train while the WebUI runs with --lowvram or --medvram (or --medvram-sdxl with an "
            "SDXL model loaded): those modes move parts "
            "of the model between CPU and GPU inside every forward pass, which a training step's backward pass "
            "cannot follow. Start the WebUI without them; with gradient checkpointing, SD1 trains in 8 GB.")


def take_off_networks(sd_model) -> None:
    """Undo any Lora/LoHa the host has merged into the weights, so we train against the pure checkpoint.

    The host applies networks by changing weights in place with a backup; restoring the backup and clearing
    the layer's applied-set makes the host apply them again at the next prompt that asks for them.
    """
    networks = sys.modules.get("networks")
    if networks is None:
        return
    with torch.no_grad():  # the host's restore is an in-place copy into weights that require grad
        for module in sd_model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)):
                networks.network_restore_weights_from_backup(module)
                if hasattr(module, "network_current_names"):
                    module.network_current_names = ()
    networks.loaded_networks.clear()


def refresh_loras() -> None:
    networks = sys.modules.get("networks")
    if networks is not None:
        networks.list_available_networks()
        if _forge or _reforge_memory:  # both keep the files they read by name: a run may have rewritten one
            networks.load_lora_state_dict.cache_clear()


@contextmanager
def _loras_put_back():
    """After lohatrain's own generations with `<lora:…>` tags: on Forge and reForge their LoRA state as found
    (lohatrain/forge/model.py, loaded first as Forge's txt2img would; lohatrain/reforge.py); in A1111 no network left
    merged."""
    if _forge:
        with _forge.loras_kept(sd_models.forge_model_reload()[0]):
            yield
        return
    if _reforge_memory:  # A1111's `networks` restore finds nothing there: reForge's LoRAs are in its UNet patchers
        with reforge_loras_kept(shared.sd_model, _reforge_memory):
            yield
        return
    try:
        yield
    finally:
        take_off_networks(shared.sd_model)  # the last cell's file is merged into the weights: take it off


_this_thread = threading.local()


@contextmanager
def _options_for_this_thread(**values):
    """Option values the host's text path reads (`opts.X`, through Options.__getattr__) for this thread only.

    The training thread needs its CLIP skip and emphasis "None" while it encodes captions; writing them into
    `opts.data` would show them to every request running meanwhile, and a Settings save could persist them.
    So `shared.opts` gets (once) a subclass whose attribute reads look at this thread's values first; every
    other read, `opts.data` and what Settings saves are unchanged.
    """
    options = shared.opts
    if not getattr(type(options), "lohatrain_thread_overlay", False):
        options.__class__ = _thread_overlay(type(options))
    previous = getattr(_this_thread, "options", None)
    _this_thread.options = {**(previous or {}), **values}
    try:
        yield
    finally:
        _this_thread.options = previous


def _thread_overlay(base: type) -> type:
    class ThreadOverlayOptions(base):
        lohatrain_thread_overlay = True

        def __getattr__(self, item):
            values = getattr(_this_thread, "options", None)
            if values and item in values:
                return values[item]
            return super().__getattr__(item)

    return ThreadOverlayOptions


def clip_skip_applies(sd_model) -> bool | None:
    """The host's text path applies CLIP skip to SD1, to SDXL's CLIP-L only with Settings → "Clip skip SDXL"
    (`sdxl_clip_l_skip`), never to SD2's OpenCLIP (None: the family's own rule). Forge applies it to every family."""
    if _forge:
        return True
    if detect(sd_model).name == "sdxl":
        return bool(getattr(shared.opts, "sdxl_clip_l_skip", False))
    return None


def prompt_encoder(sd_model, clip_skip: int | None):
    """The host's conditioning path with the run's CLIP skip, and captions taken literally.

    With emphasis "None" the host does not parse `(word:1.2)` or BREAK, so captions with brackets (common in
    booru tags) are trained as written; chunking past 75 tokens and embeddings work as at inference.
    """
    skip = clip_skip if clip_skip is not None else host_clip_skip()

    def encode(prompts: list[str]):
        with _options_for_this_thread(CLIP_stop_at_last_layers=skip, emphasis="None"):
            if not _forge:
                return sd_model.get_learned_conditioning(prompts)
            with _forge.clip_skip(sd_model, skip):  # Forge's text path runs in inference mode: copies out
                cond = sd_model.get_learned_conditioning(prompts)
            return {k: v.clone() for k, v in cond.items()} if isinstance(cond, dict) else cond.clone()

    return encode


TAGGERS = ("deepbooru", "interrogator")
# The host's own tag options (Settings → Interrogate), which the tab shows and may change for one pass.
TAG_OPTIONS = ("interrogate_deepbooru_score_threshold", "deepbooru_sort_alpha", "deepbooru_use_spaces",
               "deepbooru_escape")
_task_lock = threading.Lock()
_task: list[str] = []  # the captioning pass or grid running now (one at a time)
_stop_task = threading.Event()


@contextmanager
def _host_task(what: str):
    """One captioning pass or grid at a time; the tab's Interrupt, or the host's, stops it between images."""
    with _task_lock:
        if _task:
            raise LohatrainError(f"{_task[0]} is running: wait for it to finish or interrupt it")
        _task.append(what)
    _stop_task.clear()
    try:
        yield
    finally:
        _task.clear()
        shared.state.interrupted = False  # as the host's wrap_gradio_call leaves it after a job


def _task_stopped() -> bool:
    return _stop_task.is_set() or shared.state.interrupted


def interrupt_task() -> bool:
    """Stop the running captioning pass or grid; False when none runs."""
    if not _task:
        return False
    _stop_task.set()
    shared.state.interrupt()
    return True


def tag_options() -> dict:
    return {key: getattr(shared.opts, key) for key in TAG_OPTIONS}


def caption_images(folder: str, tagger: str, options: captions.CaptionOptions, tag_options: dict,
                   via: str) -> Iterator[captions.CaptionStep]:
    """Caption a folder with the host's DeepBooru (`deepbooru.model`, started once and stopped at the end,
    which moves it off the GPU as the host's own batch captioning does) or its interrogator
    (`shared.interrogator.interrogate`, which loads and unloads BLIP and CLIP itself). Each image takes one
    turn of the GPU queue, so generations go on between images; the host's Interrupt, or the tab's, stops
    the pass within one image."""
    if tagger not in TAGGERS:
        raise LohatrainError(f"tagger must be one of {', '.join(TAGGERS)}, not {tagger!r}")
    check_dataset_path(folder, via)
    unknown = set(tag_options) - set(TAG_OPTIONS)
    if unknown:
        raise LohatrainError(f"unknown tag options: {', '.join(sorted(unknown))}")
    from modules import deepbooru
    state, started = shared.state, False

    def tag(image) -> str:
        nonlocal started
        with call_queue.queue_lock, _options_for_this_thread(**tag_options):
            state.begin(job="lohatrain-caption")
            try:
                if tagger == "interrogator":
                    return shared.interrogator.interrogate(image.convert("RGB"))
                if not started:
                    deepbooru.model.start()
                    started = True
                return deepbooru.model.tag_multi(image)
            finally:
                if state.interrupted:
                    _stop_task.set()
                state.end()

    with _host_task("a captioning pass"):
        try:
            yield from captions.caption_folder(folder, tag, options, should_stop=_task_stopped)
        finally:
            if started:
                deepbooru.model.stop()


@dataclasses.dataclass
class RenderedGrid:
    plan: grid.GridPlan
    images: list  # one labelled grid per prompt (PIL images)
    files: list[Path]  # where each was saved, beside the LoRA
    cells: list  # [prompt][strength][column]: the images as rendered, unlabelled


def make_grid(name: str, prompts: list[str] | None = None, strengths: list[float] | None = None,
              seed: int | None = None) -> RenderedGrid:
    """The run's saved steps (columns, after one without the LoRA) × strengths (rows), for each prompt,
    through the host's own txt2img on the loaded checkpoint with one seed, labelled like its X/Y/Z plot and
    saved as PNG beside the file. The no-LoRA image is rendered once per prompt: it is the same in every row.
    Afterwards the model's weights are as before (the host merges a Lora into them while it generates; on Forge
    and reForge, their patchers and loaded LoRAs are as found too)."""
    from modules import images

    folder = lora_dir()
    chosen = grid.plan(folder, name, prompts, strengths, seed)
    check_sampler(chosen.settings.preview_sampler)
    state, done = shared.state, 0
    checkpoint_title = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "title", None)

    def render(prompt: str) -> object:
        nonlocal done
        if _task_stopped():
            raise LohatrainError("Interrupted: no grid was saved.")
        state.job_no, state.textinfo = done, f"lohatrain grid: image {done + 1} of {chosen.cells}"
        rendered = _txt2img(shared.sd_model, prompt, chosen.settings, chosen.seed, checkpoint_title,
                            extra_networks=True)
        if not rendered or _task_stopped():
            raise LohatrainError("Interrupted: no grid was saved.")
        done += 1
        return rendered[0]

    with _host_task("a grid"), call_queue.queue_lock:
        state.begin(job="lohatrain-grid")
        state.job_count = chosen.cells
        try:
            with _loras_put_back():
                refresh_loras()  # the Lora list must know the intermediate saves
                cells = []
                for prompt in chosen.prompts:
                    plain = render(prompt)
                    cells.append([[plain] + [render(f"{prompt} <lora:{column.network}:{strength:g}>")
                                             for column in chosen.columns[1:]] for strength in chosen.strengths])
        finally:
            state.end()
    labelled, files = [], []
    for index, rows in enumerate(cells):
        width, height = rows[0][0].size
        picture = images.draw_grid_annotations(
            images.image_grid([cell for row in rows for cell in row], rows=len(rows)), width, height,
            [[images.GridAnnotation(column.label)] for column in chosen.columns],
            [[images.GridAnnotation(f"Strength: {strength:g}")] for strength in chosen.strengths])
        path = chosen.file(folder, index)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        write_atomically(path, buffer.getvalue(), overwrite=True)
        labelled.append(picture)
        files.append(path)
    return RenderedGrid(chosen, labelled, files, cells)


def _progress_to_state(job: Job):
    state = shared.state

    def report(p: Progress) -> None:
        job.report(p)
        state.textinfo = p.stage if p.stage != "Training" else (
            f"LoHa training: step {p.step}/{p.total}, loss {p.smooth_loss:.4f}")
        if p.total:
            state.job_count, state.sampling_steps, state.sampling_step = 1, p.total, p.step

    return report


def _preview_maker(settings: TrainSettings, job: Job, sd_model, out_dir: Path):
    prompts = [p for p in settings.preview_prompts if p.strip()] or [settings.caption_phrase or ""]
    every = settings.preview_every_steps if getattr(shared.opts, "lohatrain_previews", True) else 0
    folder = out_dir / f"{settings.name}.previews"
    checkpoint_title = getattr(getattr(sd_model, "sd_checkpoint_info", None), "title", None)

    def on_step(step: int, network) -> None:
        if not every or (step % every and step != settings.steps):
            return
        saved = (shared.state.job_count, shared.state.sampling_step, shared.state.sampling_steps)
        # The trainer moved the VAE and (with cached captions) the text encoders off the GPU; txt2img needs them.
        # Forge's and reForge's memory managers load them themselves (and the trainer reloads the UNet afterwards).
        family = detect(sd_model)
        parts = [] if family.host_managed else [sd_model.first_stage_model, family.text_encoder(sd_model)]
        part_devices = [next(part.parameters()).device for part in parts]
        for part in parts:
            part.to(next(sd_model.model.parameters()).device)
        try:
            images = _txt2img(sd_model, prompts[0], settings, settings.preview_seed, checkpoint_title,
                              extra_networks=False)
        finally:
            for part, device in zip(parts, part_devices):
                part.to(device)
            shared.state.job_count, shared.state.sampling_step, shared.state.sampling_steps = saved
        if not images:  # interrupted while sampling: the run stops after this step anyway
            return
        image = images[0]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        image.save(path)
        image.save(out_dir / f"{settings.name}.preview.png")  # the Lora tab's card picture
        shared.state.assign_current_image(image)
        job.set_preview(path, step)

    return on_step


def _txt2img(sd_model, prompt: str, settings: TrainSettings, seed: int, checkpoint_title: str | None,
             extra_networks: bool) -> list:
    """One image through the host's own txt2img, with the run's size, sampler and steps. The checkpoint is
    pinned: a new choice in the quick settings must not load into this model meanwhile."""
    p = processing.StableDiffusionProcessingTxt2Img(
        sd_model=sd_model, prompt=prompt, seed=seed, steps=settings.preview_steps,
        sampler_name=settings.preview_sampler, scheduler="Automatic", width=settings.resolution,
        height=settings.resolution, do_not_save_grid=True, do_not_save_samples=True,
        override_settings={"sd_model_checkpoint": checkpoint_title})
    p.disable_extra_networks = not extra_networks
    # reForge's processing reads `p.scripts` unchecked: a runner as the host's txt2img route gives one, but with no
    # scripts, so other extensions' always-on scripts (ControlNet, ADetailer…) leave previews and grid cells alone.
    p.scripts = scripts.ScriptRunner()
    return processing.process_images(p).images


@contextmanager
def _unet_session(sd_model):
    """The last generation's LoRAs off for the run, each host its own way: Forge's and reForge's sessions load their
    unpatched UNet patchers (and tell their memory managers what the run needs); A1111's `networks` restore, and the
    trainer moves the parts itself (no `load_unet`)."""
    if _forge:
        with _forge.unet_session(sd_model) as load_unet:
            yield load_unet
    elif _reforge_memory:
        with reforge_unet_session(sd_model, _reforge_memory) as load_unet:
            yield load_unet
    else:
        take_off_networks(sd_model)
        yield None


def run_training(settings: TrainSettings, job: Job) -> TrainResult:
    """What a job does in the WebUI: wait for the GPU queue, train on the loaded model, refresh the Lora list."""
    preflight(settings, via=job.via, resuming=job.resume is not None)
    if settings.clip_skip is None:  # record the host's current setting, so the file says what was used
        settings = dataclasses.replace(settings, clip_skip=host_clip_skip())
    out_dir = lora_dir()
    with call_queue.queue_lock:
        state = shared.state
        state.begin(job="lohatrain")
        try:
            # Forge: the chosen checkpoint, loaded now if it was not yet (it returns at once when it is)
            sd_model = sd_models.forge_model_reload()[0] if _forge else shared.sd_model
            detect(sd_model)
            if _forge:  # its checkpoint may only just have been loaded: the model's checks preflight left out
                engine_preflight(sd_model, settings, out_dir, job.resume is not None)
            info = getattr(sd_model, "sd_checkpoint_info", None)
            with _unet_session(sd_model) as load_unet:
                result = train(
                    sd_model, settings, output_dir=out_dir,
                    encode_prompts=prompt_encoder(sd_model, settings.effective_clip_skip),
                    model_name=Path(getattr(info, "filename", "") or "unknown").name,
                    model_hash=getattr(info, "sha256", None) or getattr(info, "shorthash", None) or "",
                    on_progress=_progress_to_state(job),
                    # Skip ends the run like Interrupt; pressed while a preview renders, the host skips that image.
                    should_stop=lambda: job.should_stop() or state.interrupted or state.skipped,
                    on_step=_preview_maker(settings, job, sd_model, out_dir), resume=job.resume,
                    resume_anyway=job.resume_anyway, clip_skip_applies=clip_skip_applies(sd_model),
                    load_unet=load_unet)
            refresh_loras()  # under the GPU lock: the Lora list is not rebuilt while a generation reads it
        finally:
            state.end()
            state.interrupted = state.skipped = False  # as the host's own jobs leave it
            release_freed_memory()
    return result


def release_freed_memory() -> None:
    """Hand what a run freed back to the system, so the WebUI's process is as large afterwards as before: the GPU's
    cache, and on Linux the C allocator's free pages (glibc keeps the many mid-sized blocks a run frees; the real
    reForge stayed 3 GB larger after runs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (Windows, macOS, musl): the allocator decides for itself
        pass
