"""What the tab's buttons and the REST routes do, the same on every host (lohatrain.hosts.current()): check and
start a run, resume one, caption a folder with the host's taggers, make the steps × strength grid; and who may ask
(the path and REST rules for a WebUI on the network)."""
from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import io
import os
import subprocess
import sys
import threading
import traceback
from contextlib import contextmanager
from hmac import compare_digest
from pathlib import Path
from typing import Iterator

import torch

from .. import allocator, captions, grid, hosts, kohya_config, memory, optimizers
from .. import dataset as ds
from ..errors import LohatrainError
from ..jobs import Job
from ..output import STATE_SUFFIX, write_atomically
from ..preflight import Prepared, check_model, prepare, preflight as engine_preflight
from ..run_state import SavedRun, list_resumable, read_state
from ..settings import TrainSettings, check_file_name
from ..trainer import Hooks, Progress, TrainResult, train

EXTENSION_DIR = Path(__file__).resolve().parents[2]
TAGGERS = ("deepbooru", "interrogator")
SETTINGS_PLACE = "Settings → LoRA training"


def loaded_family() -> str:
    """The loaded model's family name ("sd1", "sd2", "sdxl"), for defaults; SD1's when it cannot be trained
    (training refuses it anyway, with the reason)."""
    return hosts.current().model_summary()["family_name"] or "sd1"


# --- who may ask --------------------------------------------------------------------------------------------------

def is_exposed(via: str) -> bool:
    """Reachable from the network without a password for this entry: the tab is protected by --gradio-auth,
    the REST routes only by --api-auth (the WebUI's --gradio-auth covers Gradio's own routes alone)."""
    access = hosts.current().access()
    return access["exposed"] and not access["gradio_auth" if via == "tab" else "api_auth"]


def api_refusal(credentials: tuple[str, str] | None, logged_in_to_tab: bool) -> tuple[int, str] | None:
    """Why a REST call is refused, as (HTTP status, message), or None to answer it.

    With --api-auth: the WebUI's own rule (modules/api/api.py, Api.auth): HTTP Basic, any of its
    `user:password` pairs, compared in constant time. Without it, on a WebUI reachable from the network: refused
    unless an administrator allowed it in Settings. The tab's own page behind --gradio-auth passes by its login.
    """
    host = hosts.current()
    access = host.access()
    if logged_in_to_tab:
        return None
    if access["api_auth"]:
        pairs = dict(pair.split(":", 1) for pair in access["api_auth"].split(",") if ":" in pair)
        if credentials is not None and credentials[0] in pairs and compare_digest(credentials[1], pairs[credentials[0]]):
            return None
        return 401, "Incorrect username or password"
    if access["exposed"] and not host.option("lohatrain_allow_unauthenticated_api", False):
        return 403, ("the WebUI is reachable from the network without --api-auth, so lohatrain's REST API is off: "
                     f"restart the WebUI with --api-auth user:password (or allow it in {SETTINGS_PLACE})")
    return None


def check_dataset_path(folder: str, via: str) -> None:
    """The path rule for every entry that reads a user-given folder (train, Check dataset): the folder is
    resolved exactly as the reader opens it (`~`, relative paths and symlinks included) before it is compared."""
    host = hosts.current()
    if not is_exposed(via) or host.option("lohatrain_allow_any_path", False):
        return
    root = Path(host.access()["root"] or EXTENSION_DIR.parents[1]).resolve()
    dataset = ds.resolve_folder(folder)
    if root not in (dataset, *dataset.parents):
        raise LohatrainError(
            f"the WebUI is reachable from the network without a password, so the dataset folder must be inside "
            f"the WebUI's folder (an administrator can allow other folders in {SETTINGS_PLACE})")


# --- a kohya config -------------------------------------------------------------------------------------------------

def import_kohya(text: str, dataset_config: str | None = None, via: str = "tab") -> kohya_config.KohyaImport:
    """A kohya config's settings for the loaded model's family. The dataset folders it names are read (to turn
    epochs into steps) only where the path rule lets this entry read them; files it names are not opened."""
    def may_read(folder: Path) -> bool:
        try:
            check_dataset_path(str(folder), via)
        except LohatrainError:
            return False
        return True

    return kohya_config.import_text(text, dataset_config, family=loaded_family(), may_read=may_read)


def kohya_form_settings(config_file: str, dataset_config_file: str | None = None) -> tuple[TrainSettings, str]:
    """The tab's *Load settings → a file*: a kohya config file (and its dataset config) as the form's settings
    (the loaded family's and the host's defaults for what it does not set) and the message to show."""
    def text(path: str, what: str) -> str:
        try:
            return Path(path).read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise LohatrainError(f"the {what} cannot be read: {e}") from None

    imported = import_kohya(text(config_file, "kohya config"),
                            text(dataset_config_file, "kohya dataset config") if dataset_config_file else None)
    settings = imported.complete(loaded_family(), hosts.current().device_defaults())
    return settings, imported.message()


# --- a run ----------------------------------------------------------------------------------------------------------

def preflight(settings: TrainSettings, via: str, resuming: bool = False) -> Prepared:
    """Everything that can refuse a run before it starts, once per click: the path rule, the host's memory options,
    the preview sampler, then the engine's own preflight on the loaded model and, on a GPU, the memory estimate (a
    run that does not fit is refused, naming what would, unless `ignore_memory_estimate`). The file goes into the
    host's Lora folder, and the run's CLIP skip is the host's setting when it sets none, so the file says what was
    used. A host that loads its model lazily (Forge) has the model's own checks made when the run loads it."""
    host = hosts.current()
    check_dataset_path(settings.dataset_dir, via)
    if settings.reg_data_dir.strip():
        check_dataset_path(settings.reg_data_dir, via)
    host.check_memory_mode()
    install_optimizer_package(settings)
    if settings.preview_every_steps:
        host.check_sampler(settings.preview_sampler)
    settings = dataclasses.replace(settings, output_dir=str(host.lora_dir()),
                                   clip_skip=host.clip_skip() if settings.clip_skip is None else settings.clip_skip)
    if not host.is_loaded():
        return prepare(settings, resuming)
    parts = host.parts()
    prepared = engine_preflight(parts, settings, resuming)
    # A resumed run ran on this card before with these settings, which it keeps: it is not refused.
    if not resuming and not settings.ignore_memory_estimate and memory.available_bytes(parts) is not None:
        try:
            est = _estimate(host, prepared)
        except LohatrainError:
            raise
        except Exception:  # noqa: BLE001 — an estimate that fails must not stop a run it knows nothing about
            traceback.print_exc()
            print("lohatrain: the memory estimate failed (above); the run starts without it", file=sys.stderr)
            return prepared
        problem = memory.refusal(est, prepared.settings)
        if problem:
            raise LohatrainError(problem)
    return prepared


def _estimate(host, prepared: Prepared, changeable: frozenset[str] | None = None) -> memory.Estimate:
    """The estimate runs the model's own code with fakes in its weights' places: under the GPU queue, so that no
    generation uses the model meanwhile, and not while a training holds it (that would wait for its end)."""
    from . import runner

    runner().check_idle()
    with host.gpu_queue():
        parts = host.parts()
        return memory.estimate(parts, prepared.settings, memory.available_bytes(parts), prepared=prepared,
                               options=memory.FitOptions(host.fp8_setting, _why_no_8bit, changeable))


def _why_no_8bit(device) -> str | None:
    """AdamW 8-bit is offered where bitsandbytes runs on the card, or is not installed yet: a Train click that
    chooses it installs it (`install_optimizer_package`)."""
    return None if importlib.util.find_spec("bitsandbytes") is None else optimizers.why_no_8bit(device)


def memory_estimate(settings: TrainSettings, via: str, changeable: frozenset[str] | None = None) -> memory.Estimate:
    """What POST /preflight answers: the click's own checks (a problem raises, as Train would), then the memory the
    run needs on the loaded model and this card (lohatrain.memory), with the recipe that would make it fit when
    it does not (only changes of `changeable` settings, when given). The message: `est.message()`."""
    host = hosts.current()
    if not host.is_loaded():
        raise LohatrainError("no model is loaded yet, so there is nothing to estimate: generate an image (or "
                             "start the run) to load it")
    prepared = preflight(dataclasses.replace(settings, ignore_memory_estimate=True), via)
    try:
        return _estimate(host, prepared, changeable)
    except LohatrainError:
        raise
    except Exception as e:  # noqa: BLE001 — said in the answer, with its reason
        traceback.print_exc()
        raise LohatrainError(f"the memory estimate failed on this model ({type(e).__name__}: {e})") from None


def fit_my_card(settings: TrainSettings, via: str, changeable: frozenset[str] | None = None
                ) -> tuple[TrainSettings, str]:
    """The tab's Fit my card: the form's settings with the recipe's changes (`memory.fit`) for the loaded model and
    this card's free memory, and the message to show (what changed, what the run then needs, and what only the
    user can change: the WebUI's FP8 option). `changeable`: the settings the form has. The settings come back as
    given where there is no GPU or the run fits already."""
    est = memory_estimate(settings, via, changeable)
    if est.fits is None:
        return settings, f"There is no GPU here, so nothing to fit: the run {est.message()}."
    if est.fits:
        return settings, f"It fits as it is: the run {est.message()}."
    recipe = est.fit
    lines = [f"Fit my card: the run {est.message()}"]
    if recipe.settings:
        lines.append("Changed in the form: " + ", ".join(f"{k} → {v}" for k, v in recipe.settings.items()) + ".")
    lines += [f"Not changed (only you can, in the WebUI): {s.host_setting}." for s in recipe.steps if s.host_setting]
    return dataclasses.replace(settings, **recipe.settings), "\n".join(lines)


def install_optimizer_package(settings: TrainSettings) -> None:
    """AdamW 8-bit's bitsandbytes (a large binary) is installed only when a run asks for it: once, at the click,
    by lohatrain's installer run as the WebUI runs it at start (its Python, PYTHONPATH its folder): install.py
    picks the version for this torch and installs it with the host's pip, --no-deps, printing one line. A failure
    refuses the run with the installer's reason."""
    if settings.optimizer != "adamw8bit" or importlib.util.find_spec("bitsandbytes") is not None:
        return
    settings.validate()  # nothing is downloaded for settings that are refused anyway
    root = os.path.abspath(".")  # the WebUI's folder, as the host's own installer runner takes it
    done = subprocess.run([sys.executable, str(EXTENSION_DIR / "install.py"), "bitsandbytes"], cwd=root,
                          env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, errors="replace")
    print(done.stdout, end="", flush=True)
    importlib.invalidate_caches()
    if done.returncode:
        reasons = [line for line in done.stdout.splitlines() if line.startswith("[lohatrain] ")]
        raise LohatrainError(reasons[-1][len("[lohatrain] "):] if reasons else
                             f"installing bitsandbytes for AdamW 8-bit failed: {done.stderr.strip()[-300:]}")


def run_training(job: Job) -> TrainResult:
    """What a job does: wait for the GPU queue, train on the loaded model in a session where nothing the host
    applied is on it, refresh the Lora list."""
    host = hosts.current()
    settings = job.prepared.settings
    with host.gpu_queue():
        state = host.state
        state.begin(job="lohatrain")
        try:
            parts = host.parts()  # Forge: the chosen checkpoint, loaded now if it was not yet
            check_model(parts, settings)  # the model the run trains, whatever was loaded at the click
            with host.session(parts) as load_unet:
                result = train(parts, settings, Hooks(
                    progress=_progress_to_state(job, state),
                    # Skip ends the run like Interrupt; pressed while a preview renders, the host skips that image.
                    stop=lambda: job.should_stop() or state.interrupted or state.skipped,
                    on_step=_preview_maker(host, parts, settings, job), load_unet=load_unet),
                    prepared=job.prepared, resume=job.resume, resume_anyway=job.resume_anyway)
            host.refresh_loras()  # under the GPU lock: the Lora list is not rebuilt while a generation reads it
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
    allocator.trim()


def _progress_to_state(job: Job, state):
    def report(p: Progress) -> None:
        job.report(p)
        state.textinfo = p.stage if p.stage != "Training" else (
            f"LoRA training: step {p.step}/{p.total}, loss {p.smooth_loss:.4f}")
        if p.total:
            state.job_count, state.sampling_steps, state.sampling_step = 1, p.total, p.step

    return report


def _preview_maker(host, parts, settings: TrainSettings, job: Job):
    prompts = [p for p in settings.preview_prompts if p.strip()] or [settings.caption_phrase or ""]
    every = settings.preview_every_steps if host.option("lohatrain_previews", True) else 0
    out_dir = job.prepared.plan.folder
    folder = out_dir / f"{settings.name}.previews"

    def on_step(step: int, network) -> None:
        if not every or (step % every and step != settings.steps):
            return
        state = host.state
        saved = (state.job_count, state.sampling_step, state.sampling_steps)
        try:
            with host.prepare_preview(parts):
                images = host.txt2img(prompts[0], settings, settings.preview_seed, extra_networks=False)
        finally:
            state.job_count, state.sampling_step, state.sampling_steps = saved
        if not images:  # interrupted while sampling: the run stops after this step anyway
            return
        image = images[0]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        image.save(path)
        image.save(out_dir / f"{settings.name}.preview.png")  # the Lora tab's card picture
        state.assign_current_image(image)
        job.set_preview(path, step, prompts[0])

    return on_step


def resumable_runs() -> list[dict]:
    """The stopped runs in the Lora folder, newest first (lohatrain.run_state.list_resumable)."""
    return list_resumable(hosts.current().lora_dir())


def resume_settings(name, steps: int | None = None) -> tuple[TrainSettings, SavedRun]:
    """A stopped run's own settings (into today's Lora folder; `steps` may extend it) and its saved state."""
    problem = check_file_name(name)
    if problem:
        raise LohatrainError(problem.replace("name", "resume: the run's name", 1))
    folder = hosts.current().lora_dir()
    saved = read_state(folder / f"{name}{STATE_SUFFIX}")
    settings = dataclasses.replace(saved.record.settings, output_dir=str(folder),
                                   **({"steps": steps} if steps else {}))
    settings.validate()
    return settings, saved


# --- captioning and the grid: one at a time, stopped by Interrupt between images ----------------------------------

_task_lock = threading.Lock()
_task: list[str] = []  # the captioning pass or grid running now
_stop_task = threading.Event()


@contextmanager
def _host_task(what: str):
    with _task_lock:
        if _task:
            raise LohatrainError(f"{_task[0]} is running: wait for it to finish or interrupt it")
        _task.append(what)
    _stop_task.clear()
    try:
        yield
    finally:
        _task.clear()
        hosts.current().state.interrupted = False  # as the host's wrap_gradio_call leaves it after a job


def _task_stopped() -> bool:
    return _stop_task.is_set() or hosts.current().state.interrupted


def interrupt_task() -> bool:
    """Stop the running captioning pass or grid; False when none runs."""
    if not _task:
        return False
    _stop_task.set()
    hosts.current().state.interrupt()
    return True


def caption_images(folder: str, tagger: str, options: captions.CaptionOptions, tag_options: dict,
                   via: str) -> Iterator[captions.CaptionStep]:
    """Caption a folder with the host's DeepBooru or interrogator. Each image takes one turn of the GPU queue, so
    generations go on between images; the host's Interrupt, or the tab's, stops the pass within one image."""
    host = hosts.current()
    if tagger not in TAGGERS:
        raise LohatrainError(f"tagger must be one of {', '.join(TAGGERS)}, not {tagger!r}")
    check_dataset_path(folder, via)
    unknown = set(tag_options) - set(host.tag_options())
    if unknown:
        raise LohatrainError(f"unknown tag options: {', '.join(sorted(unknown))}")
    state = host.state

    with _host_task("a captioning pass"), host.tagger(tagger, tag_options) as tag_image:
        def tag(image) -> str:
            with host.gpu_queue():
                state.begin(job="lohatrain-caption")
                try:
                    return tag_image(image)
                finally:
                    if state.interrupted:
                        _stop_task.set()
                    state.end()

        yield from captions.caption_folder(folder, tag, options, should_stop=_task_stopped)


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
    Afterwards the host's LoRA state is as found (it merges a Lora into the weights while it generates)."""
    host = hosts.current()
    folder = host.lora_dir()
    chosen = grid.plan(folder, name, prompts, strengths, seed)
    host.check_sampler(chosen.settings.preview_sampler)
    state, done = host.state, 0

    def render(prompt: str) -> object:
        nonlocal done
        if _task_stopped():
            raise LohatrainError("Interrupted: no grid was saved.")
        state.job_no, state.textinfo = done, f"lohatrain grid: image {done + 1} of {chosen.cells}"
        rendered = host.txt2img(prompt, chosen.settings, chosen.seed, extra_networks=True)
        if not rendered or _task_stopped():
            raise LohatrainError("Interrupted: no grid was saved.")
        done += 1
        return rendered[0]

    with _host_task("a grid"), host.gpu_queue():
        state.begin(job="lohatrain-grid")
        state.job_count = chosen.cells
        try:
            with host.loras_kept():
                host.refresh_loras()  # the Lora list must know the intermediate saves
                cells = []
                for prompt in chosen.prompts:
                    plain = render(prompt)
                    cells.append([[plain] + [render(f"{prompt} <lora:{column.network}:{strength:g}>")
                                             for column in chosen.columns[1:]] for strength in chosen.strengths])
        finally:
            state.end()
    labelled, files = [], []
    for index, rows in enumerate(cells):
        picture = host.label_grid([cell for row in rows for cell in row], [c.label for c in chosen.columns],
                                  [f"Strength: {strength:g}" for strength in chosen.strengths])
        path = chosen.file(folder, index)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        write_atomically(path, buffer.getvalue(), overwrite=True)
        labelled.append(picture)
        files.append(path)
    return RenderedGrid(chosen, labelled, files, cells)
