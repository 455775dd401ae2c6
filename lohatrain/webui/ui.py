"""The "LoRA training" tab, built with the host's Gradio (3.41), laid out like the original product.

The form maps one-to-one onto TrainSettings; Train starts a job in the shared JobRunner and returns at once.
The live panel (progress bar, loss chart, preview) is drawn by javascript/lohatrain.js from the job's status,
the data `GET /lohatrain/v1/status` gives, which it fetches through a hidden Gradio event of this tab: so
the panel is protected by --gradio-auth like the rest of the tab and needs none of the REST API's credentials.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import html
import importlib.util
import itertools
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable

import gradio as gr

from .. import captions
from .. import dataset as ds
from .. import doctor
from .. import optimizers
from ..errors import LohatrainError
from ..families import BY_NAME as FAMILIES
from ..jobs import JobRunner
from ..methods import TYPES
from ..settings import (CUSTOM_PRESET, DTYPES, HUBER_SCHEDULES, LOSS_TYPES, SCHEDULERS, SETTING_HELP, TrainSettings,
                        bucket_sides_for, check_file_name, network_type)
from ..targets import TARGETS
from .. import hosts
from . import actions
from .api import public_status

METHOD_LABELS = {name: t.label for name, t in TYPES.items()}
CAPTION_LABELS = {"none": "No caption", "phrase": "Single phrase", "txt": "TXT captions"}
TAGGER_LABELS = {"deepbooru": "DeepBooru (booru tags)", "interrogator": "BLIP + CLIP interrogator (a sentence)"}
EXISTING_LABELS = {"keep": "Keep them", "append": "Add the new tags to them", "overwrite": "Replace them"}
OPTIMIZER_LABELS = {name: o.label for name, o in optimizers.OPTIMIZERS.items()}
# settings the form shows by label
LABELS = {"training_method": METHOD_LABELS, "caption_mode": CAPTION_LABELS, "optimizer": OPTIMIZER_LABELS}
CUSTOM_LABEL = "Custom (set the sizes below)"
# Fields whose default depends on the training method (its presets and rate), and those that also depend on
# the loaded model's family (see settings.FAMILY_DEFAULTS and the presets).
SIZE_FIELDS = ["dim", "alpha", "conv_dim", "conv_alpha", "lokr_factor"]  # what a preset sets
METHOD_FIELDS = ["network_preset", *SIZE_FIELDS, "learning_rate"]
FAMILY_FIELDS = METHOD_FIELDS + ["resolution", "batch_size", "bucket_min_side", "bucket_max_side"]
SAVED_PRESETS_DIR = actions.EXTENSION_DIR / "presets"
BUCKET_FIELDS = ("bucket_min_side", "bucket_max_side")  # 0 in the tab: half and twice the resolution
# what the suggested steps and rate follow, in suggestion()'s order
SUGGESTION_FOLLOWS = ["training_method", "batch_size", "optimizer", "adafactor_relative_step"]
CHECK_FIELDS = ["dataset_dir", "caption_mode", "caption_phrase", "caption_ext", "resolution", "bucketing",
                *BUCKET_FIELDS, "batch_size", "reg_data_dir", "masked_loss"]  # what "Check dataset" reads, in its order

# Form fields in the order the handlers receive them; each is a TrainSettings field.
FIELDS = ["training_method", "dora", "lokr_factor", "network_preset", "dim", "alpha", "conv_dim", "conv_alpha", "clip_skip", "name", "dataset_dir",
          "caption_mode", "caption_phrase", "caption_ext", "resolution", "bucketing", "learning_rate", "steps",
          "batch_size", "train_dtype", "save_dtype", "gradient_checkpointing", "seed", "deterministic",
          "shuffle_tags", "keep_tokens", "flip_aug", "color_aug", "save_every_steps", "lr_scheduler",
          "lr_warmup_steps", "noise_offset", "min_snr_gamma", "text_encoder_lr", "bucket_min_side",
          "bucket_max_side", "overwrite", "zero_terminal_snr", "ignore_memory_estimate", "preview_every_steps",
          "preview_prompts", "keep_state",
          "init_from", "preview_seed", "preview_steps", "preview_sampler",
          # the Advanced panels (the options people know from kohya: issue 21)
          "optimizer", "optimizer_args", "weight_decay", "prodigy_d_coef", "prodigy_bias_correction",
          "prodigy_safeguard_warmup", "adafactor_relative_step",
          "network_targets", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
          "masked_loss", "multires_noise_iterations", "multires_noise_discount", "ip_noise_gamma",
          "debiased_estimation_loss", "loss_type", "huber_schedule", "huber_c", "huber_scale", "min_timestep",
          "max_timestep",
          "reg_data_dir", "prior_loss_weight", "caption_dropout_rate", "caption_tag_dropout_rate",
          "keep_tokens_separator"]
INT_FIELDS = {"lokr_factor", "dim", "conv_dim", "clip_skip", "resolution", "steps", "batch_size", "seed", "keep_tokens",
              "save_every_steps", "lr_warmup_steps", "bucket_min_side", "bucket_max_side", "preview_every_steps",
              "preview_seed", "preview_steps", "multires_noise_iterations", "min_timestep", "max_timestep"}


@dataclasses.dataclass(frozen=True)
class Applies:
    """When a form field applies: a test of one choice, the value of another setting (its engine name, not its
    label)."""
    choice: str
    when: Callable[[str], bool]


# Only the fields that apply to the current choices are on screen: each field shown for some choices only says
# when, here. A field that does not apply is hidden, and its value is left out of the run's settings (their
# default holds). A new choice needs no more than its fields' entries (and its labels in LABELS if its form shows
# labels).
_HUBER = ("huber", "smooth_l1")
APPLIES = {
    "dora": Applies("training_method", lambda method: network_type(method).dora),
    "lokr_factor": Applies("training_method", lambda method: network_type(method).sized_by_factor),
    "conv_dim": Applies("training_method", lambda method: network_type(method).convolutions),
    "conv_alpha": Applies("training_method", lambda method: network_type(method).convolutions),
    "caption_phrase": Applies("caption_mode", lambda mode: mode == "phrase"),
    "caption_ext": Applies("caption_mode", lambda mode: mode == "txt"),
    "prodigy_d_coef": Applies("optimizer", lambda name: name == "prodigy"),
    "prodigy_bias_correction": Applies("optimizer", lambda name: name == "prodigy"),
    "prodigy_safeguard_warmup": Applies("optimizer", lambda name: name == "prodigy"),
    "adafactor_relative_step": Applies("optimizer", lambda name: name == "adafactor"),
    "multires_noise_discount": Applies("multires_noise_iterations", lambda iterations: bool(iterations)),
    "huber_schedule": Applies("loss_type", lambda loss: loss in _HUBER),
    "huber_c": Applies("loss_type", lambda loss: loss in _HUBER),
    "huber_scale": Applies("loss_type", lambda loss: loss in _HUBER),
}


def applying(choice: str, fields: list[str], label) -> list:
    """The visibility of `fields` (each depends on `choice`) for this choice's form value."""
    value = _key_for(LABELS.get(choice, {}), label)
    return [gr.update(visible=APPLIES[name].when(value)) for name in fields]


def settings_from_form(values: list) -> TrainSettings:
    """Form values → validated settings (raises SettingsError listing every bad value); the values of fields that
    do not apply to the choices are left out."""
    data = dict(zip(FIELDS, values))
    for key, labels in LABELS.items():
        data[key] = _key_for(labels, data[key])
    data["network_preset"] = _preset_key(data["network_preset"])
    for key, rule in APPLIES.items():
        if not rule.when(data[rule.choice]):
            del data[key]
    for key in INT_FIELDS & data.keys():
        value = data[key]
        if isinstance(value, float) and value.is_integer():
            data[key] = int(value)
    data["preview_prompts"] = [p.strip() for p in (data["preview_prompts"] or "").splitlines() if p.strip()]
    data["init_from"] = data["init_from"] or ""
    data["weight_decay"] = _optional_number(data["weight_decay"])
    for key in ("bucket_min_side", "bucket_max_side"):  # 0: follow the resolution (half and twice it)
        if not data[key]:
            del data[key]
    data["output_dir"] = str(hosts.current().lora_dir())
    # sizes that differ from the chosen preset make it "custom"
    return TrainSettings.from_dict(data, family=actions.loaded_family())


def form_values(settings: TrainSettings) -> list:
    """Settings → form values (for loading a saved preset): the preset among its own type's."""
    values = []
    for key in FIELDS:
        value = getattr(settings, key)
        if key == "network_preset":
            labels = preset_labels(actions.loaded_family(), settings.training_method)
            value = gr.update(choices=list(labels.values()), value=labels[value])
        elif key in LABELS:
            value = LABELS[key][value]
        elif key == "preview_prompts":
            value = "\n".join(value)
        elif key == "clip_skip" and value is None:
            value = hosts.current().clip_skip()
        elif key == "weight_decay":
            value = "" if value is None else str(value)
        values.append(value)
    return values


def _optional_number(text):
    """A number typed in a text field, None when it is empty. A text field, as an empty gr.Number sends 0; what is
    not a number is kept, for the settings' message."""
    text = (text or "").strip()
    try:
        return float(text) if text else None
    except ValueError:
        return text


def _key_for(labels: dict, label):
    return next((k for k, v in labels.items() if v == label), label)


def preset_labels(family: str, method: str = "loha") -> dict[str, str]:
    """Preset key → dropdown label, with the file size on the family's full-size model."""
    labels = {key: f"{p.label} (~{p.file_mb:g} MB on {FAMILIES[family].label})"
              for key, p in TYPES[method].presets[family].items()}
    return {**labels, CUSTOM_PRESET: CUSTOM_LABEL}


def _preset_key(label):
    for method in TYPES:
        for family in FAMILIES:
            key = _key_for(preset_labels(family, method), label)
            if key != label:
                return key
    return label


def _message(text: str, kind: str = "info") -> str:
    lines = "<br>".join(html.escape(line) for line in str(text).splitlines())
    return f'<div class="lohatrain-message lohatrain-{kind}">{lines}</div>'


# Gradio 3 (A1111, reForge main) and Gradio 4 (Forge 2) name a few event arguments differently.
_GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4
_JS = "js" if _GRADIO_4 else "_js"  # the keyword of an event's front-end code
# Gradio 4's way for a change event: one made while the last is answered runs after it (Gradio 3 has no choice)
_LIKE_CHANGE = {"trigger_mode": "always_last"} if _GRADIO_4 else {}


INTRO = ("### Train a LoRA on the loaded checkpoint\n"
         "Teach the checkpoint the WebUI has loaded a character, a style or an object from a folder of your images "
         "(10 to 50 is typical). Choose the folder and press **Check dataset**, then **Train**: the file goes into "
         "your Lora folder, and **Send to txt2img** puts `<lora:name:1>` into the prompt. The defaults suit most "
         "runs.")


def _model_markdown(s: dict | None = None) -> str:
    """The model line: the checkpoint loaded now (`s`: the host's model_summary), its family or why it cannot be
    trained, and what this host cannot do."""
    s = s or hosts.current().model_summary()
    text = f"**Loaded checkpoint:** {s['name']}" + (f" `[{s['hash']}]`" if s["hash"] else "")
    notes = "".join(f"\n\nℹ️ {note}" for note in hosts.current().notes)
    if s["family"]:
        return text + f" — {s['family']}" + notes
    return text + f"\n\n⚠️ {s['problem']}" + notes


def _types_markdown(family: str) -> str:
    """Each network type in one line: what it suits, and its files' sizes (its presets) on the family's model."""
    lines = [f"What each type suits, and the sizes of its files on {FAMILIES[family].label}:"]
    for t in TYPES.values():
        sizes = [p.file_mb for p in t.presets[family].values()]
        lines.append(f"- **{t.label}**, {min(sizes):.0f}–{max(sizes):.0f} MB: {t.summary}")
    dora = [t.label.split(" (")[0] for t in TYPES.values() if t.dora]
    lines.append(f"- **DoRA**, a switch on {', '.join(dora)}: learns each weight's size and direction apart, often "
                 "closer to a full fine-tune at the same file size; its steps are a little slower")
    return "\n".join(lines)


def _model_view() -> list:
    """What follows the loaded model: its line, the Base model list's choice, the types' file sizes."""
    s = hosts.current().model_summary()
    return [_model_markdown(s), s["title"] or None, _types_markdown(s["family_name"] or "sd1")]


def refresh_model() -> list:
    """🔄: the host's checkpoints listed again, and what follows the model as the model loaded now makes it."""
    markdown, title, types = _model_view()
    return [gr.update(choices=hosts.current().checkpoint_titles(), value=title), markdown, types]


def _answer(text: str, kind: str = "info", job_id: str | None = None) -> str:
    """Train's or Resume's answer. Each carries a fresh token, so the live panel (javascript/lohatrain.js) knows
    it from the answer before and from Gradio's own pending marks; a started job's also carries its id."""
    marks = f'data-lohatrain-answer="{uuid.uuid4().hex}" ' + (f'data-lohatrain-job="{job_id}" ' if job_id else "")
    return _message(text, kind).replace("<div ", "<div " + marks, 1)


def start_training(runner: JobRunner, *values) -> str:
    try:
        settings = settings_from_form(list(values))
        job_id = runner.start(actions.preflight(settings, via="tab"), via="tab")
    except LohatrainError as e:
        return _answer(str(e), "error")
    return _answer(f"Training {settings.name} started: progress below.", job_id=job_id)


def fit_my_card(*values) -> list:
    """Fit my card: the form's fields the recipe changes (actions.fit_my_card), the others left as they are."""
    try:
        settings, text = actions.fit_my_card(settings_from_form(list(values)), "tab", frozenset(FIELDS))
    except LohatrainError as e:
        return [_message(str(e), "error"), *(gr.update() for _ in values)]
    return [_message(text), *(_changed(new, old) for new, old in zip(form_values(settings), values))]


def _changed(new, old):
    """One field's update: the new value, or none where the form has it already. `form_values` gives some fields as
    an update already (the preset, with its type's choices): that one goes as it is, never inside another."""
    value = new.get("value") if isinstance(new, dict) else new
    if value == old:
        return gr.update()
    return new if isinstance(new, dict) else gr.update(value=new)


def _run_label(run: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(run["saved_at"]))
    return (f"{run['name']} — step {run['step']}/{run['total']} — {METHOD_LABELS.get(run['method'], run['method'])}"
            f" — {run['model']} — {when}")


def resume_choices() -> list[str]:
    try:
        return [_run_label(r) for r in actions.resumable_runs()]
    except LohatrainError:
        return []


def lora_file_names() -> list[str]:
    """The .safetensors files in the Lora folder a new run can start from (`init_from`)."""
    try:
        return [""] + sorted(p.name for p in hosts.current().lora_dir().glob("*.safetensors"))
    except (LohatrainError, OSError):
        return [""]


def resume_training(runner: JobRunner, label, anyway) -> str:
    """Resume the chosen stopped run with its own settings; the answer is marked as Train's (`_answer`)."""
    try:
        run = next((r for r in actions.resumable_runs() if _run_label(r) == label), None)
        if run is None:
            raise LohatrainError("Choose a stopped run to resume (🔄 lists them again).")
        settings, saved = actions.resume_settings(run["name"])
        job_id = runner.start(actions.preflight(settings, via="tab", resuming=True), via="tab", resume=saved,
                              resume_anyway=bool(anyway))
    except LohatrainError as e:
        return _answer(str(e), "error")
    return _answer(f"Resuming {settings.name} at step {saved.step} of {settings.steps}: progress below.",
                   job_id=job_id)


_answers = itertools.count()


def lora_file(name) -> str | None:
    """`name` when the Lora folder has its file (a file Send to txt2img can name), else None."""
    if not name or check_file_name(name):
        return None
    try:
        return name if (hosts.current().lora_dir() / f"{name}.safetensors").is_file() else None
    except (LohatrainError, OSError):
        return None


def poll_status(runner: JobRunner, sent_preview, shown_model, name):
    """The panel's status (no server paths) with what the page needs beside it: a counter (each answer differs),
    whether the job's file is on disk, the project name when its file is (javascript/lohatrain.js decides what
    Send to txt2img names), the preview image inline when this page has not had it yet; then the name of that
    preview, and what follows the loaded model when it changed since this page was told (both per-page
    gr.States)."""
    status = runner.status()
    data = public_status(status)
    data.update(answer=next(_answers), file_exists=bool(status.get("file")) and Path(status["file"]).is_file(),
                project_file=lora_file(name))
    job = runner.job
    current = f"{data.get('job_id')}:{data.get('preview_step')}"
    if data.get("preview_url") and current != sent_preview and job and job.preview:
        try:
            data["preview_data"] = "data:image/png;base64," + base64.b64encode(Path(job.preview).read_bytes()).decode()
            sent_preview = current
        except OSError:  # deleted meanwhile: the next poll tries the next preview
            pass
    view = _model_view()
    shown = json.dumps(view)
    model = [gr.update()] * 3 if shown == shown_model else [view[0], gr.update(value=view[1]), view[2]]
    return [json.dumps(data), sent_preview, *model, shown]


def interrupt(runner: JobRunner) -> str:
    if runner.interrupt():
        return _message("Stopping after the current step; what was trained so far will be saved.")
    if actions.interrupt_task():
        return _message("Stopping after the current image.")
    return _message("Nothing is running.")


def caption_dataset(runner: JobRunner, dataset_dir, tagger_label, existing_label, prefix, drop_tags, ext,
                    threshold, sort_alpha, use_spaces, escape):
    """Caption the folder with the host's tagger, a progress line per image; at the end the thumbnails show
    the new captions. A generator: Gradio sends each line as it comes."""
    if runner.job is not None and runner.job.state == "running":
        yield _message("A training is running: caption the images before training, or after it.", "error"), \
            gr.update(), gr.update()
        return
    options = captions.CaptionOptions(ext=(ext or ".txt").strip(), prefix=prefix or "", drop_tags=drop_tags or "",
                                      existing=_key_for(EXISTING_LABELS, existing_label))
    tag_options = {"interrogate_deepbooru_score_threshold": float(threshold), "deepbooru_sort_alpha": bool(sort_alpha),
                   "deepbooru_use_spaces": bool(use_spaces), "deepbooru_escape": bool(escape)}
    counts, step = Counter(), None
    try:
        for step in actions.caption_images(dataset_dir, _key_for(TAGGER_LABELS, tagger_label), options, tag_options,
                                        via="tab"):
            counts[step.outcome] += 1
            yield _message(f"Captioning {step.done} of {step.total}: {step.file}"), gr.update(), gr.update()
        shown, names = _thumbnails(dataset_dir, options.ext)
    except LohatrainError as e:
        yield _message(str(e), "error"), gr.update(), gr.update()
        return
    summary = (f"Wrote {counts['written']} caption(s), kept {counts['kept']}"
               + (f"; {counts['broken']} image(s) do not open" if counts["broken"] else ""))
    stopped = step is not None and step.done < step.total
    yield _message(summary + ("; interrupted." if stopped else ".")), shown, names


def make_grid(runner: JobRunner, name, prompts, strengths, seed):
    """The steps × strength grid of the run named in the form (lohatrain/grid.py, actions.make_grid)."""
    if runner.job is not None and runner.job.state == "running":
        return _message("A training is running: make the grid when it has finished.", "error"), gr.update()
    try:
        values = [float(x) for x in (strengths or "").replace(";", ",").split(",") if x.strip()]
    except ValueError:
        return _message("Strengths are numbers separated by commas, such as 0.5, 0.75, 1", "error"), gr.update()
    try:
        made = actions.make_grid(name, [p for p in (prompts or "").splitlines() if p.strip()], values,
                              int(seed) if seed not in (None, "") and int(seed) >= 0 else None)
    except LohatrainError as e:
        return _message(str(e), "error"), gr.update()
    return (_message(f"Saved {', '.join(f.name for f in made.files)} beside the file."),
            [(picture, prompt) for picture, prompt in zip(made.images, made.plan.prompts)])


def _thumbnails(dataset_dir, ext: str) -> tuple[list, list[str]]:
    """The gallery's (image, caption) pairs and the images' names in the dataset behind them ("2_alice/photo.png"
    in a kohya sub-folder; a per-page state, for editing)."""
    shown = captions.thumbnails(dataset_dir, ext)
    folder = ds.resolve_folder(dataset_dir) if shown else None
    return shown, [Path(p).relative_to(folder).as_posix() for p, _ in shown]


def select_thumbnail(names, evt: gr.SelectData):
    """A clicked thumbnail's file and caption, for editing."""
    name = names[evt.index] if names and evt.index < len(names) else ""
    caption = evt.value
    if isinstance(caption, dict):  # Gradio 4 (Forge) sends the gallery item, {"image": ..., "caption": ...}
        caption = caption.get("caption")
    caption = caption if isinstance(caption, str) and caption != captions.NO_CAPTION else ""
    return name, caption


def save_edited_caption(dataset_dir, name, text, ext):
    try:
        path = captions.save_caption(dataset_dir, name, text or "", (ext or ".txt").strip())
        shown, names = _thumbnails(dataset_dir, path.suffix)
    except LohatrainError as e:
        return _message(str(e), "error"), gr.update(), gr.update()
    return _message(f"Saved {path.name}."), shown, names


def check_dataset(dataset_dir, caption_label, phrase, ext, resolution, bucketing, min_side, max_side,
                  batch_size=1, reg_data_dir="", masked_loss=False):
    """Count, kohya's folders (repeats, draws, the regularization share), buckets and captions, then the dataset
    doctor's findings grouped by problem (lohatrain/doctor.py) and the images with their captions, before anything
    is trained; the last value is the doctor's report, for the suggested steps (None when the folder was not
    read)."""
    mode = _key_for(CAPTION_LABELS, caption_label)
    low, high = bucket_sides_for(int(resolution))
    min_side, max_side = int(min_side or 0) or low, int(max_side or 0) or high
    reg_data_dir = (reg_data_dir or "").strip()
    try:
        actions.check_dataset_path(dataset_dir, via="tab")
        if reg_data_dir:
            actions.check_dataset_path(reg_data_dir, via="tab")
        found = doctor.check(dataset_dir, mode, ext, phrase, int(resolution), int(batch_size), bool(bucketing),
                             int(min_side), int(max_side), reg_data_dir, bool(masked_loss))
    except (LohatrainError, ValueError) as e:
        return _message(str(e), "error"), [], [], None
    doctor_html = _doctor_html(found)
    shown, names = _thumbnails(dataset_dir, ext or ".txt")
    try:
        items = ds.scan_dataset(dataset_dir, mode, phrase, ext, reg_data_dir, masked_loss=bool(masked_loss))
        bucket_of = ds.assign_buckets(items, int(resolution), bool(bucketing), int(min_side), int(max_side))
    except (LohatrainError, ValueError) as e:
        if any(doctor.KINDS[p.kind].blocks for p in found.problems):  # the doctor names what blocks training
            return doctor_html, shown, names, found
        return doctor_html + _message(str(e), "error"), shown, names, found
    draws = ds.draws_per_epoch(items)
    kohya = len(found.folders) > 1 or any(f.repeats > 1 for f in found.folders)
    per_epoch = dict(ds.bucket_table(items, bucket_of, draws))
    rows = "".join(f"<tr><td>{w}×{h}</td><td>{n}</td>" + (f"<td>{per_epoch.get((w, h), 0)}</td>" if kohya else "")
                   + "</tr>" for (w, h), n in ds.bucket_table(items, bucket_of))
    captioned = sum(1 for i in items if i.caption.strip() and not i.regularization)
    # what an upscaled image does is the doctor's "Too small", said once there
    note = ds.grouping_note(items, bucket_of, int(resolution), bool(bucketing), int(min_side), int(max_side))
    report = (f'<div class="lohatrain-dataset"><p><b>{found.images}</b> images, <b>{captioned}</b> with a caption'
              + (f", and <b>{found.regularization_images}</b> regularization images" if found.regularization_images
                 else "") + ".</p>"
              + (_folders_html(found.folders) if kohya else "")
              + "<table><tr><th>bucket</th><th>images</th>" + ("<th>draws per epoch</th>" if kohya else "")
              + f"</tr>{rows}</table>"
              + (f"<p class='lohatrain-warnings'>{html.escape(note)}</p>" if note else "") + "</div>") + doctor_html
    return report, shown, names, found


def _folders_html(folders) -> str:
    """kohya's folders: repeats, images, draws per epoch and their share, the trigger of each."""
    rows = "".join(
        f"<tr><td>{html.escape(f.name)}{' (regularization)' if f.regularization else ''}</td><td>{f.repeats}</td>"
        f"<td>{f.images}</td><td>{f.draws}</td><td>{f.share:.0%}</td><td>{html.escape(f.trigger)}</td></tr>"
        for f in folders)
    return ('<table class="lohatrain-folders"><tr><th>folder</th><th>repeats</th><th>images</th>'
            f"<th>draws per epoch</th><th>share</th><th>trigger</th></tr>{rows}</table>")


def _doctor_html(found: doctor.Report) -> str:
    """The doctor's findings by problem: what it does and what to do once, then each file it concerns once."""
    groups = []
    for kind, problems in found.by_kind().items():
        k = doctor.KINDS[kind]
        files = "".join(f'<li data-file="{html.escape(p.file)}"><code>{html.escape(p.file)}</code> '
                        f'{html.escape(p.detail)}</li>' for p in problems)
        blocks = " <b>Training cannot start until this is fixed.</b>" if k.blocks else ""
        groups.append(f'<li class="lohatrain-problem" data-kind="{html.escape(kind)}"><b>{html.escape(k.title)}</b> '
                      f'({len(problems)}): {html.escape(k.advice)}.{blocks}<ul>{files}</ul></li>')
    top = ", ".join(f"{html.escape(tag)} ({n})" for tag, n in list(found.tag_frequency.items())[:12])
    return ('<div class="lohatrain-doctor">'
            + (f'<p>Trigger: <code>{html.escape(found.trigger)}</code></p>' if found.trigger else "")
            + (f'<p>Most used tags: {top}</p>' if top else "")
            + (f'<ul class="lohatrain-problems">{"".join(groups)}</ul>' if groups else "<p>No problems found.</p>")
            + "".join(f"<p>Not checked: {html.escape(s)}</p>" for s in found.skipped)
            + "</div>")


def suggested_learning_rate(method: str, family: str, optimizer: str = optimizers.DEFAULT,
                            relative_step: bool = True) -> tuple[float, str]:
    """The rate to start from and why, in plain words: the type's own rate on the family (methods.TYPES) as the
    optimizer wants it (Prodigy 1.0, Lion a third; lohatrain.optimizers.suggested_rate)."""
    kind, label = TYPES[method], FAMILIES[family].label
    rate, why = optimizers.suggested_rate(optimizer, kind.learning_rate_for(family), relative_step)
    return rate, f"{why}, for {kind.label} on {label}"


def suggestion(found, method_label, batch_size, optimizer=optimizers.DEFAULT, relative_step=True) -> list:
    """After Check dataset: the steps (dataset doctor) and learning rate (type and optimizer) to start from, in
    plain words, and the Apply button; nothing before a folder was checked."""
    if not found or not found.images:
        return [gr.update(value="", visible=False), gr.update(visible=False)]
    steps, why_steps = doctor.suggest_steps(found.images, int(batch_size), found.folders)
    rate, why_rate = suggested_learning_rate(_key_for(METHOD_LABELS, method_label), actions.loaded_family(),
                                             _key_for(LABELS.get("optimizer", {}), optimizer), bool(relative_step))
    return [gr.update(value=f'<div class="lohatrain-suggestion"><b>Suggested:</b> {steps} steps at learning rate '
                            f'{rate:g}.<br>{html.escape(why_steps)}; {rate:g} is {html.escape(why_rate)}.</div>',
                      visible=True), gr.update(visible=True)]


def apply_suggestion(found, method_label, batch_size, optimizer=optimizers.DEFAULT, relative_step=True) -> list:
    """Apply: the suggested steps and learning rate into the form."""
    steps, _ = doctor.suggest_steps(found.images, int(batch_size), found.folders)
    rate, _ = suggested_learning_rate(_key_for(METHOD_LABELS, method_label), actions.loaded_family(),
                                      _key_for(LABELS.get("optimizer", {}), optimizer), bool(relative_step))
    return [steps, rate]


def preset_sizes(label, method_label):
    p = TYPES[_key_for(METHOD_LABELS, method_label)].presets[actions.loaded_family()].get(_preset_key(label))
    if p is None:
        return [gr.update()] * 5
    return [p.dim, p.alpha, p.conv_dim, p.conv_alpha, p.factor]


def saved_preset_names() -> list[str]:
    return sorted(p.stem for p in SAVED_PRESETS_DIR.glob("*.json"))


def save_preset(preset_name, *values):
    if not (preset_name or "").strip():
        return _message("Type a name for these settings in 'Save as' first.", "error"), gr.update()
    problem = check_file_name(preset_name)
    if problem:
        return _message(problem.replace("name", "the settings' name", 1), "error"), gr.update()
    try:
        settings = settings_from_form(list(values))
    except LohatrainError as e:
        return _message(str(e), "error"), gr.update()
    SAVED_PRESETS_DIR.mkdir(exist_ok=True)
    (SAVED_PRESETS_DIR / f"{preset_name}.json").write_text(settings.to_json() + "\n", encoding="utf-8")
    return _message(f"Saved settings as {preset_name}."), gr.update(choices=saved_preset_names(), value=preset_name)


def load_preset(preset_name):
    path = SAVED_PRESETS_DIR / f"{preset_name}.json"
    if not preset_name or check_file_name(preset_name) or not path.exists():
        return [_message("Choose a saved preset first.", "error")] + [gr.update()] * len(FIELDS)
    try:
        settings = TrainSettings.load(path)
    except LohatrainError as e:
        return [_message(str(e), "error")] + [gr.update()] * len(FIELDS)
    return [_message(f"Loaded {preset_name}.")] + form_values(settings)


def default_values(family: str, method: str, fields: list[str], optimizer: str = optimizers.DEFAULT) -> list:
    """`fields`' values for the defaults of a family and method (the preset dropdown with their labels), the
    learning rate as the optimizer wants it."""
    d = dataclasses.replace(TrainSettings.defaults_for(family, method), **hosts.current().device_defaults())
    d.learning_rate, _ = optimizers.suggested_rate(optimizer, d.learning_rate)
    labels = preset_labels(family, method)
    return [gr.update(choices=list(labels.values()), value=labels[d.network_preset])] + [
        0 if key in BUCKET_FIELDS else getattr(d, key) for key in fields[1:]]


def method_changed(method_label, optimizer_label=OPTIMIZER_LABELS[optimizers.DEFAULT]):
    """Another training method picked: its presets, sizes and learning rate (for the chosen optimizer)."""
    return default_values(actions.loaded_family(), _key_for(METHOD_LABELS, method_label), METHOD_FIELDS,
                          _key_for(OPTIMIZER_LABELS, optimizer_label))


def optimizer_changed(optimizer_label, method_label, learning_rate, text_encoder_lr) -> list:
    """Another optimizer picked: the learning rate it wants (Prodigy 1.0: it finds the step size itself) and a
    line saying why. A trained text encoder keeps its rate's ratio to the UNet's; with Prodigy it gets the same
    rate, as Prodigy adapts one step size for the whole network."""
    name = _key_for(OPTIMIZER_LABELS, optimizer_label)
    if name not in optimizers.OPTIMIZERS:
        return [gr.update()] * 3
    rate, why = suggested_learning_rate(_key_for(METHOD_LABELS, method_label), actions.loaded_family(), name)
    encoder = text_encoder_lr or 0
    if encoder and name == "prodigy":
        encoder = rate
    elif encoder and learning_rate:
        encoder = encoder * rate / learning_rate
    note = f"Learning rate{'s' if encoder else ''} set to {rate:g}, which is {why}."
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        note += " Its package, bitsandbytes (a large download), is installed once, when Train is pressed."
    return [rate, encoder, gr.update(value=note, visible=True)]


def _upload_path(file) -> str | None:
    """An uploaded file's path: Gradio 3 gives a temporary file object, Gradio 4 its path."""
    return getattr(file, "name", file) or None


def load_kohya(config, dataset_config) -> list:
    """A kohya config put into *Load settings* (a kohya_ss GUI JSON or an sd-scripts TOML, and its dataset config;
    either alone): the form as it sets it, the loaded family's and the host's defaults for the rest, the dataset
    folder kept when it names none; the message says what was not taken."""
    config, dataset_config = _upload_path(config), _upload_path(dataset_config)
    if not config and not dataset_config:
        return [gr.update()] * (1 + len(FIELDS))
    try:
        settings, text = actions.kohya_form_settings(config or dataset_config, dataset_config if config else None)
    except LohatrainError as e:
        return [_message(str(e), "error")] + [gr.update()] * len(FIELDS)
    values = form_values(settings)
    if not settings.dataset_dir:
        values[FIELDS.index("dataset_dir")] = gr.update()
    return [_message(text)] + values


def load_checkpoint(title, method_label, optimizer_label=OPTIMIZER_LABELS[optimizers.DEFAULT]):
    """Load through the host; when the family changes (say SD1 → SDXL), the family's defaults replace the
    sizes, resolution, batch and rate, and the message says so."""
    before = actions.loaded_family()
    try:
        hosts.current().load_checkpoint(title)
    except LohatrainError as e:
        return [_model_markdown(), _message(str(e), "error")] + [gr.update()] * len(FAMILY_FIELDS)
    after = actions.loaded_family()
    if after == before:
        return [_model_markdown(), _message(f"Loaded {title}.")] + [gr.update()] * len(FAMILY_FIELDS)
    return [_model_markdown(), _message(
        f"Loaded {title}. It is an {FAMILIES[after].label} model: network size, resolution, batch size and "
        f"learning rate are now {FAMILIES[after].label}'s defaults.")] + default_values(
            after, _key_for(METHOD_LABELS, method_label), FAMILY_FIELDS, _key_for(OPTIMIZER_LABELS, optimizer_label))


# The tab, panel by panel. Each `_…_panel` makes its components in the order they show, wires the events that
# stay inside it, and returns them as a Panel; lay_out lays the panels out and _wire wires the events between them.
# A Panel field named after a TrainSettings field is that setting's form field. A new panel: a Panel subclass,
# its `_…_panel` function, its place in Tab and lay_out, and its settings in FIELDS (and INT_FIELDS); a field
# that applies to some choices only says when in APPLIES (lay_out and _wire show and hide it).


@dataclasses.dataclass
class Panel:
    def settings(self) -> dict:
        """This panel's form fields by setting name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in FIELDS}


@dataclasses.dataclass
class MethodPanel(Panel):
    training_method: gr.Dropdown
    dora: gr.Checkbox
    lokr_factor: gr.Number
    types: gr.Markdown


def _method_panel(d: TrainSettings) -> MethodPanel:
    """The network type first: it decides the presets, sizes and learning rate below; each type in one line."""
    with gr.Row():
        method = gr.Dropdown(list(METHOD_LABELS.values()), value=METHOD_LABELS[d.training_method],
                             label="Training method", elem_id="lohatrain_method")
        dora = gr.Checkbox(d.dora, label="DoRA (weight decomposition)", elem_id="lohatrain_dora")
        lokr_factor = gr.Number(d.lokr_factor, label="LoKr factor (-1 = automatic)", precision=0,
                                elem_id="lohatrain_lokr_factor")
    # a callable value: each page load shows the sizes on the model loaded then
    types = gr.Markdown(lambda: _types_markdown(actions.loaded_family()), elem_id="lohatrain_types")
    return MethodPanel(method, dora, lokr_factor, types)


@dataclasses.dataclass
class ModelPanel(Panel):
    summary: gr.Markdown
    checkpoint: gr.Dropdown
    refresh: gr.Button
    load: gr.Button


def _model_panel() -> ModelPanel:
    """The checkpoint the WebUI has loaded (what is trained on), and another one to load through the WebUI. The
    values are callables: each page load shows the model loaded then (the panel's polling keeps them so)."""
    with gr.Row():
        summary = gr.Markdown(_model_markdown, elem_id="lohatrain_model")
    with gr.Row():
        checkpoint = gr.Dropdown(hosts.current().checkpoint_titles(),
                                 value=lambda: hosts.current().model_summary()["title"] or None,
                                 label="Base model (loads through the WebUI)", elem_id="lohatrain_checkpoint")
        refresh = gr.Button("\U0001f504", scale=0, min_width=50, elem_id="lohatrain_refresh_checkpoints")
        load = gr.Button("Load", scale=0, min_width=90, elem_id="lohatrain_load_checkpoint")
    return ModelPanel(summary, checkpoint, refresh, load)


@dataclasses.dataclass
class NetworkPanel(Panel):
    network_preset: gr.Dropdown
    clip_skip: gr.Slider
    dim: gr.Number
    alpha: gr.Number
    conv_dim: gr.Number
    conv_alpha: gr.Number


def _network_panel(d: TrainSettings, labels: dict[str, str]) -> NetworkPanel:
    """The preset, and the sizes it sets (folded: most users keep the preset's)."""
    with gr.Row():
        preset = gr.Dropdown(list(labels.values()), value=labels[d.network_preset], label="Network preset",
                             elem_id="lohatrain_preset")
        # a callable value: each page load shows the WebUI's CLIP-skip setting as it is then
        clip_skip = gr.Slider(1, 12, step=1, value=hosts.current().clip_skip, label="CLIP skip",
                              elem_id="lohatrain_clip_skip")
    with gr.Accordion("Network size", open=False):
        with gr.Row():
            return NetworkPanel(
                preset, clip_skip,
                dim=gr.Number(d.dim, label="Dim (rank)", precision=0, elem_id="lohatrain_dim"),
                alpha=gr.Number(d.alpha, label="Alpha", elem_id="lohatrain_alpha"),
                conv_dim=gr.Number(d.conv_dim, label="Conv dim (0 = attention only)", precision=0,
                                   elem_id="lohatrain_conv_dim"),
                conv_alpha=gr.Number(d.conv_alpha, label="Conv alpha", elem_id="lohatrain_conv_alpha"))


@dataclasses.dataclass
class DatasetPanel(Panel):
    name: gr.Textbox
    dataset_dir: gr.Textbox
    caption_mode: gr.Radio
    caption_phrase: gr.Textbox
    caption_ext: gr.Textbox


def _dataset_panel(d: TrainSettings) -> DatasetPanel:
    """What the file is called and what it learns from: the images and where their captions come from."""
    name = gr.Textbox(d.name, label="Project name (file name and <lora:name:1>)", elem_id="lohatrain_name")
    dataset_dir = gr.Textbox("", label="Dataset folder", placeholder="/path/to/images", elem_id="lohatrain_dataset")
    with gr.Row():
        caption_mode = gr.Radio(list(CAPTION_LABELS.values()), value=CAPTION_LABELS[d.caption_mode], label="Captions",
                                elem_id="lohatrain_caption_mode")
        caption_phrase = gr.Textbox("", label="Phrase (Single phrase)", elem_id="lohatrain_phrase")
        caption_ext = gr.Textbox(d.caption_ext, label="Caption extension", elem_id="lohatrain_ext")
    return DatasetPanel(name, dataset_dir, caption_mode, caption_phrase, caption_ext)


@dataclasses.dataclass
class TaggerPanel(Panel):
    tagger: gr.Radio
    existing: gr.Radio
    prefix: gr.Textbox
    drop_tags: gr.Textbox
    threshold: gr.Slider
    sort_alpha: gr.Checkbox
    use_spaces: gr.Checkbox
    escape: gr.Checkbox
    caption: gr.Button
    message: gr.HTML


def _tagger_panel() -> TaggerPanel:
    """Captions written by the WebUI's own taggers, for a folder that has none yet (or too few)."""
    with gr.Accordion("Caption the images with the WebUI's taggers", open=False, elem_id="lohatrain_caption_box"):
        with gr.Row():
            tagger = gr.Radio(list(TAGGER_LABELS.values()), value=TAGGER_LABELS["deepbooru"], label="Tagger",
                              elem_id="lohatrain_tagger")
            existing = gr.Radio(list(EXISTING_LABELS.values()), value=EXISTING_LABELS["keep"],
                                label="Images that already have a caption", elem_id="lohatrain_existing")
        with gr.Row():
            prefix = gr.Textbox("", label="Put first (your trigger phrase)", elem_id="lohatrain_caption_prefix")
            drop_tags = gr.Textbox("", label="Leave out these tags (comma-separated)", elem_id="lohatrain_drop_tags")
        # the host's own DeepBooru options (Settings → Interrogate) as they are when the page loads;
        # a change here holds for this pass only
        with gr.Row():
            threshold = gr.Slider(0, 1, step=0.01, value=lambda: hosts.current().tag_options()[
                "interrogate_deepbooru_score_threshold"], label="DeepBooru score threshold",
                elem_id="lohatrain_tag_threshold")
            sort_alpha = gr.Checkbox(lambda: hosts.current().tag_options()["deepbooru_sort_alpha"],
                                     label="Sort tags alphabetically")
            use_spaces = gr.Checkbox(lambda: hosts.current().tag_options()["deepbooru_use_spaces"],
                                     label="Spaces instead of underscores", elem_id="lohatrain_tag_spaces")
            escape = gr.Checkbox(lambda: hosts.current().tag_options()["deepbooru_escape"], label="Escape brackets")
        with gr.Row():
            caption = gr.Button("Caption", scale=0, min_width=120, elem_id="lohatrain_caption")
            message = gr.HTML("", elem_id="lohatrain_caption_message")
    return TaggerPanel(tagger, existing, prefix, drop_tags, threshold, sort_alpha, use_spaces, escape, caption,
                       message)


@dataclasses.dataclass
class TrainingPanel(Panel):
    resolution: gr.Slider
    bucketing: gr.Checkbox
    learning_rate: gr.Number
    steps: gr.Number
    batch_size: gr.Slider


def _training_panel(d: TrainSettings) -> TrainingPanel:
    """The few numbers most runs change: resolution, rate, length and batch."""
    with gr.Row():
        resolution = gr.Slider(64, 2048, step=64, value=d.resolution, label="Training resolution",
                               elem_id="lohatrain_resolution")
        bucketing = gr.Checkbox(d.bucketing, label="Aspect ratio grouping", elem_id="lohatrain_bucketing")
    with gr.Row():
        return TrainingPanel(
            resolution, bucketing,
            learning_rate=gr.Number(d.learning_rate, label="Learning rate", elem_id="lohatrain_lr"),
            steps=gr.Number(d.steps, label="Training steps", precision=0, elem_id="lohatrain_steps"),
            batch_size=gr.Slider(1, 16, step=1, value=d.batch_size, label="Batch size",
                                 elem_id="lohatrain_batch_size"))


@dataclasses.dataclass
class DeveloperPanel(Panel):
    train_dtype: gr.Radio
    save_dtype: gr.Radio
    gradient_checkpointing: gr.Checkbox
    seed: gr.Number
    deterministic: gr.Checkbox
    shuffle_tags: gr.Checkbox
    keep_tokens: gr.Number
    flip_aug: gr.Checkbox
    color_aug: gr.Checkbox
    save_every_steps: gr.Number
    lr_scheduler: gr.Dropdown
    lr_warmup_steps: gr.Number
    noise_offset: gr.Number
    min_snr_gamma: gr.Number
    text_encoder_lr: gr.Number
    bucket_min_side: gr.Number
    bucket_max_side: gr.Number
    overwrite: gr.Checkbox
    zero_terminal_snr: gr.Checkbox
    ignore_memory_estimate: gr.Checkbox


def _developer_panel(d: TrainSettings) -> DeveloperPanel:
    """Every other setting, folded away: the defaults suit most runs."""
    made = {}
    with gr.Accordion("Developer options", open=False, elem_id="lohatrain_dev"):
        with gr.Row():
            made["train_dtype"] = gr.Radio(list(DTYPES), value=d.train_dtype, label="Train format",
                                        elem_id="lohatrain_train_dtype")
            made["save_dtype"] = gr.Radio(list(DTYPES), value=d.save_dtype, label="Save format",
                                       elem_id="lohatrain_save_dtype")
        with gr.Row():
            made["gradient_checkpointing"] = gr.Checkbox(d.gradient_checkpointing, label="Gradient checkpointing")
            made["seed"] = gr.Number(d.seed, label="Seed (-1 = random, recorded)", precision=0,
                                     elem_id="lohatrain_seed")
            made["deterministic"] = gr.Checkbox(d.deterministic, label="Deterministic (GPU, slower)")
        with gr.Row():
            made["shuffle_tags"] = gr.Checkbox(d.shuffle_tags, label="Shuffle tags")
            made["keep_tokens"] = gr.Number(d.keep_tokens, label="Keep first N tags", precision=0)
            made["flip_aug"] = gr.Checkbox(d.flip_aug, label="Flip augmentation")
            made["color_aug"] = gr.Checkbox(d.color_aug, label="Color augmentation")
        with gr.Row():
            made["save_every_steps"] = gr.Number(d.save_every_steps, label="Save every N steps (0 = off)", precision=0)
            made["lr_scheduler"] = gr.Dropdown(list(SCHEDULERS), value=d.lr_scheduler, label="LR scheduler")
            made["lr_warmup_steps"] = gr.Number(d.lr_warmup_steps, label="Warm-up steps", precision=0)
        with gr.Row():
            made["noise_offset"] = gr.Number(d.noise_offset, label="Noise offset")
            made["min_snr_gamma"] = gr.Number(d.min_snr_gamma, label="Min-SNR gamma (0 = off)")
            made["text_encoder_lr"] = gr.Number(d.text_encoder_lr, label="Text encoder LR (0 = off)")
        with gr.Row():
            made["bucket_min_side"] = gr.Number(0, label="Bucket min side (0 = half the resolution)", precision=0,
                                             elem_id="lohatrain_bucket_min")
            made["bucket_max_side"] = gr.Number(0, label="Bucket max side (0 = twice the resolution)", precision=0,
                                             elem_id="lohatrain_bucket_max")
            made["overwrite"] = gr.Checkbox(d.overwrite, label="Overwrite an existing file",
                                            elem_id="lohatrain_overwrite")
            made["zero_terminal_snr"] = gr.Checkbox(d.zero_terminal_snr,
                                                    label="Zero terminal SNR (v-prediction models)")
            made["ignore_memory_estimate"] = gr.Checkbox(
                d.ignore_memory_estimate, label="Train even when the memory estimate says it does not fit",
                elem_id="lohatrain_ignore_memory_estimate")
    return DeveloperPanel(**made)


def _setting(component, d: TrainSettings, name: str, label: str, **options):
    """The form field of the setting `name` in an Advanced panel: its default from `d`, its help line the setting's
    own (SETTING_HELP, as the command line's --help says it), kohya's name for it in its label."""
    if label.lower().replace(" ", "_") != name:
        label = f"{label} ({name})"
    options.setdefault("value", getattr(d, name))
    return component(label=label, info=SETTING_HELP[name], elem_id=f"lohatrain_{name}", **options)


@dataclasses.dataclass
class OptimizerPanel(Panel):
    optimizer: gr.Dropdown
    note: gr.Markdown  # why the learning rate changed with the pick (optimizer_changed)
    weight_decay: gr.Textbox  # empty: the optimizer's own
    optimizer_args: gr.Textbox
    prodigy_d_coef: gr.Number
    prodigy_bias_correction: gr.Checkbox
    prodigy_safeguard_warmup: gr.Checkbox
    adafactor_relative_step: gr.Checkbox


def _optimizer_panel(d: TrainSettings) -> OptimizerPanel:
    """The optimizer by its label, and each optimizer's own options shown only while it is chosen (APPLIES)."""
    with gr.Accordion("Advanced: optimizer", open=False, elem_id="lohatrain_optimizer_box"):
        with gr.Row():
            optimizer = gr.Dropdown(list(OPTIMIZER_LABELS.values()), value=OPTIMIZER_LABELS[d.optimizer],
                                    label="Optimizer", info=SETTING_HELP["optimizer"], elem_id="lohatrain_optimizer")
            weight_decay = _setting(gr.Textbox, d, "weight_decay", "Weight decay", placeholder="the optimizer's own",
                                    value="" if d.weight_decay is None else str(d.weight_decay))
        note = gr.Markdown("", visible=False, elem_id="lohatrain_optimizer_note")
        optimizer_args = _setting(gr.Textbox, d, "optimizer_args", "Optimizer arguments",
                                  placeholder="weight_decay=0.05 betas=0.9,0.99")
        with gr.Row():
            return OptimizerPanel(
                optimizer, note, weight_decay, optimizer_args,
                prodigy_d_coef=_setting(gr.Number, d, "prodigy_d_coef", "Prodigy d_coef"),
                prodigy_bias_correction=_setting(gr.Checkbox, d, "prodigy_bias_correction",
                                                 "Prodigy bias correction"),
                prodigy_safeguard_warmup=_setting(gr.Checkbox, d, "prodigy_safeguard_warmup",
                                                  "Prodigy safeguard warmup"),
                adafactor_relative_step=_setting(gr.Checkbox, d, "adafactor_relative_step",
                                                 "Adafactor relative step"))


@dataclasses.dataclass
class TargetsPanel(Panel):
    network_targets: gr.Dropdown
    down_lr_weight: gr.Textbox
    mid_lr_weight: gr.Textbox
    up_lr_weight: gr.Textbox
    block_lr_zero_threshold: gr.Number


def _targets_panel(d: TrainSettings) -> TargetsPanel:
    """What the network adapts, and kohya's per-block learning-rate weights."""
    with gr.Accordion("Advanced: network targets and block weights", open=False, elem_id="lohatrain_targets_box"):
        with gr.Row():
            targets = _setting(gr.Dropdown, d, "network_targets", "Network targets", choices=list(TARGETS))
            threshold = _setting(gr.Number, d, "block_lr_zero_threshold", "Block weights' zero threshold")
        with gr.Row():
            return TargetsPanel(
                targets,
                down_lr_weight=_setting(gr.Textbox, d, "down_lr_weight", "Down blocks' weights"),
                mid_lr_weight=_setting(gr.Textbox, d, "mid_lr_weight", "Middle block's weight"),
                up_lr_weight=_setting(gr.Textbox, d, "up_lr_weight", "Up blocks' weights"),
                block_lr_zero_threshold=threshold)


@dataclasses.dataclass
class LossPanel(Panel):
    masked_loss: gr.Checkbox
    debiased_estimation_loss: gr.Checkbox
    multires_noise_iterations: gr.Number
    multires_noise_discount: gr.Number
    ip_noise_gamma: gr.Number
    loss_type: gr.Dropdown
    huber_schedule: gr.Dropdown
    huber_c: gr.Number
    huber_scale: gr.Number
    min_timestep: gr.Number
    max_timestep: gr.Number


def _loss_panel(d: TrainSettings) -> LossPanel:
    """kohya's loss and noise variants by their names: all off by default."""
    made = {}
    with gr.Accordion("Advanced: loss and noise", open=False, elem_id="lohatrain_loss_box"):
        with gr.Row():
            made["masked_loss"] = _setting(gr.Checkbox, d, "masked_loss", "Masked loss")
            made["debiased_estimation_loss"] = _setting(gr.Checkbox, d, "debiased_estimation_loss",
                                                        "Debiased estimation loss")
        with gr.Row():
            made["multires_noise_iterations"] = _setting(gr.Number, d, "multires_noise_iterations",
                                                         "Multires noise iterations", precision=0)
            made["multires_noise_discount"] = _setting(gr.Number, d, "multires_noise_discount",
                                                       "Multires noise discount")
            made["ip_noise_gamma"] = _setting(gr.Number, d, "ip_noise_gamma", "Input perturbation noise")
        with gr.Row():
            made["loss_type"] = _setting(gr.Dropdown, d, "loss_type", "Loss type", choices=list(LOSS_TYPES))
            made["huber_schedule"] = _setting(gr.Dropdown, d, "huber_schedule", "Huber schedule",
                                              choices=list(HUBER_SCHEDULES))
            made["huber_c"] = _setting(gr.Number, d, "huber_c", "Huber c")
            made["huber_scale"] = _setting(gr.Number, d, "huber_scale", "Huber scale")
        with gr.Row():
            made["min_timestep"] = _setting(gr.Number, d, "min_timestep", "Min timestep", precision=0)
            made["max_timestep"] = _setting(gr.Number, d, "max_timestep", "Max timestep", precision=0)
    return LossPanel(**made)


@dataclasses.dataclass
class DatasetOptionsPanel(Panel):
    reg_data_dir: gr.Textbox
    prior_loss_weight: gr.Number
    caption_dropout_rate: gr.Number
    caption_tag_dropout_rate: gr.Number
    keep_tokens_separator: gr.Textbox


def _dataset_options_panel(d: TrainSettings) -> DatasetOptionsPanel:
    """kohya's regularization images and caption options (its N_name sub-folders need no setting)."""
    with gr.Accordion("Advanced: dataset options", open=False, elem_id="lohatrain_dataset_options_box"):
        with gr.Row():
            reg_data_dir = _setting(gr.Textbox, d, "reg_data_dir", "Regularization folder",
                                    placeholder="/path/to/class-images")
            prior_loss_weight = _setting(gr.Number, d, "prior_loss_weight", "Prior loss weight")
        with gr.Row():
            return DatasetOptionsPanel(
                reg_data_dir, prior_loss_weight,
                caption_dropout_rate=_setting(gr.Number, d, "caption_dropout_rate", "Caption dropout rate"),
                caption_tag_dropout_rate=_setting(gr.Number, d, "caption_tag_dropout_rate", "Tag dropout rate"),
                keep_tokens_separator=_setting(gr.Textbox, d, "keep_tokens_separator", "Keep tokens separator"))


@dataclasses.dataclass
class PreviewPanel(Panel):
    preview_every_steps: gr.Number
    preview_prompts: gr.Textbox
    preview_seed: gr.Number
    preview_steps: gr.Number
    preview_sampler: gr.Dropdown


def _preview_panel(d: TrainSettings) -> PreviewPanel:
    """Pictures made with the network while it trains, through the host's own txt2img."""
    with gr.Accordion("Previews", open=False):
        every = gr.Number(d.preview_every_steps, label="Preview every N steps (0 = off)", precision=0,
                          elem_id="lohatrain_preview_every")
        prompts = gr.Textbox("", lines=2, label="Preview prompt (default: the phrase)",
                             elem_id="lohatrain_preview_prompt")
        with gr.Row():
            return PreviewPanel(
                every, prompts,
                preview_seed=gr.Number(d.preview_seed, label="Preview seed", precision=0,
                                       elem_id="lohatrain_preview_seed"),
                preview_steps=gr.Number(d.preview_steps, label="Preview sampling steps", precision=0,
                                        elem_id="lohatrain_preview_steps"),
                preview_sampler=gr.Dropdown(hosts.current().sampler_names(), value=d.preview_sampler,
                                            label="Preview sampler", elem_id="lohatrain_preview_sampler"))


@dataclasses.dataclass
class ResumePanel(Panel):
    run: gr.Dropdown
    resume: gr.Button
    anyway: gr.Checkbox
    keep_state: gr.Checkbox
    init_from: gr.Dropdown


def _resume_panel(d: TrainSettings) -> ResumePanel:
    """Going on from a stopped run's saved state, or starting a new run from a finished file."""
    with gr.Accordion("Resume a stopped run, or train a file further", open=False, elem_id="lohatrain_resume_box"):
        with gr.Row():
            run = gr.Dropdown(resume_choices(), label="Stopped runs (name — step — type — model — saved)",
                              elem_id="lohatrain_resume_run")
            refresh = gr.Button("\U0001f504", scale=0, min_width=50, elem_id="lohatrain_refresh_runs")
            resume = gr.Button("Resume", scale=0, min_width=100, elem_id="lohatrain_resume")
        with gr.Row():
            anyway = gr.Checkbox(False, label="Resume even if the images or the model changed",
                                 elem_id="lohatrain_resume_anyway")
            keep_state = gr.Checkbox(d.keep_state, label="Keep the run's state when it finishes",
                                     elem_id="lohatrain_keep_state")
        init_from = gr.Dropdown(lora_file_names(), value="",
                                label="Start a new run from this file (same type and size)",
                                elem_id="lohatrain_init_from")
    # listing files needs no GPU: outside the queue, so it answers at once even while something generates
    refresh.click(lambda: [gr.update(choices=resume_choices()), gr.update(choices=lora_file_names())], [],
                  [run, init_from], queue=False)
    return ResumePanel(run, resume, anyway, keep_state, init_from)


@dataclasses.dataclass
class SavedSettingsPanel(Panel):
    saved: gr.Dropdown
    save_as: gr.Textbox
    save: gr.Button
    load: gr.Button
    kohya_config: gr.File  # loaded as it is put in (load_kohya)
    kohya_dataset_config: gr.File


def _saved_settings_panel() -> SavedSettingsPanel:
    """The whole form saved under a name, to train the same way again; or the settings of a kohya config."""
    with gr.Row():
        saved = gr.Dropdown(saved_preset_names(), label="Saved settings", elem_id="lohatrain_saved")
        save_as = gr.Textbox("", label="Save as", elem_id="lohatrain_saved_name")
        save = gr.Button("Save settings", scale=0, min_width=120, elem_id="lohatrain_save_settings")
        load = gr.Button("Load settings", scale=0, min_width=120, elem_id="lohatrain_load_settings")
    with gr.Accordion("Load settings from a kohya config", open=False, elem_id="lohatrain_kohya_box"):
        with gr.Row():
            return SavedSettingsPanel(
                saved, save_as, save, load,
                kohya_config=gr.File(label="kohya_ss GUI config (.json) or sd-scripts config (.toml)",
                                     file_types=[".json", ".toml"], elem_id="lohatrain_kohya_config"),
                kohya_dataset_config=gr.File(label="Its dataset config (.toml, optional)",
                                             file_types=[".toml", ".json"], elem_id="lohatrain_kohya_dataset"))


@dataclasses.dataclass
class RunPanel(Panel):
    check: gr.Button
    train: gr.Button
    message: gr.HTML
    fit: gr.Button
    poll: gr.Button  # hidden: javascript/lohatrain.js presses it (poll_status)
    status_json: gr.Textbox  # hidden: the status it reads
    sent_preview: gr.State  # the preview this page has
    shown_model: gr.State  # what follows the loaded model, as this page was last told


def _run_panel(runner: JobRunner) -> RunPanel:
    """Train, Interrupt and the live panel that javascript/lohatrain.js draws from the polled status; Send to
    txt2img, which it enables once the file it names exists."""
    with gr.Row():
        check = gr.Button("Check dataset", elem_id="lohatrain_check")
        train = gr.Button("Train", variant="primary", elem_id="lohatrain_train")
        fit = gr.Button("Fit my card", elem_id="lohatrain_fit")
        interrupt_btn = gr.Button("Interrupt", elem_id="lohatrain_interrupt")
    message = gr.HTML("", elem_id="lohatrain_message")
    gr.HTML('<div id="lohatrain_live"></div>')
    status_json = gr.Textbox("", show_label=False, interactive=False, elem_id="lohatrain_status_json",
                             elem_classes=["lohatrain-hidden"])
    poll = gr.Button("status", elem_id="lohatrain_poll", elem_classes=["lohatrain-hidden"])
    send = gr.Button("Send to txt2img", elem_id="lohatrain_send")
    interrupt_btn.click(lambda: interrupt(runner), [], [message])
    send.click(None, [], [], **{_JS: "lohatrainSendToTxt2img"})
    return RunPanel(check, train, message, fit, poll, status_json, sent_preview=gr.State(None),
                    shown_model=gr.State(None))


@dataclasses.dataclass
class GalleryPanel(Panel):
    suggestion: gr.HTML
    apply: gr.Button
    images: gr.State  # the last check's doctor.Report (the suggestion follows the type and batch size)
    report: gr.HTML
    thumbs: gr.Gallery
    shown_files: gr.State


def _gallery_panel() -> GalleryPanel:
    """The dataset check's suggested steps and rate, its report, and the images with their captions (shown_files:
    the files behind them)."""
    with gr.Row():
        suggestion = gr.HTML("", visible=False, elem_id="lohatrain_suggestion")
        apply = gr.Button("Apply", visible=False, scale=0, min_width=90, elem_id="lohatrain_apply")
    return GalleryPanel(
        suggestion, apply, images=gr.State(None),
        report=gr.HTML("", elem_id="lohatrain_report"),
        thumbs=gr.Gallery(label="Dataset (click an image to edit its caption)", columns=4, height="auto",
                          elem_id="lohatrain_thumbs"),
        shown_files=gr.State([]))


@dataclasses.dataclass
class GridPanel(Panel):
    prompts: gr.Textbox
    strengths: gr.Textbox
    grid_seed: gr.Number  # not `seed`: that names the training seed's form field
    make: gr.Button
    message: gr.HTML
    images: gr.Gallery


def _grid_panel() -> GridPanel:
    """The steps × strength grid of the trained file, to choose which save to keep and at what weight."""
    with gr.Accordion("Steps × strength grid of the trained file", open=False, elem_id="lohatrain_grid_box"):
        prompts = gr.Textbox("", lines=2, label="Prompts, one a line (default: the preview prompt)",
                             elem_id="lohatrain_grid_prompts")
        with gr.Row():
            strengths = gr.Textbox("0.5, 0.75, 1", label="Strengths (rows)", elem_id="lohatrain_grid_strengths")
            seed = gr.Number(-1, label="Seed (-1 = the preview seed)", precision=0, elem_id="lohatrain_grid_seed")
            make = gr.Button("Make grid", scale=0, min_width=120, elem_id="lohatrain_grid")
        return GridPanel(prompts, strengths, seed, make,
                         message=gr.HTML("", elem_id="lohatrain_grid_message"),
                         images=gr.Gallery(label="Grid: the saved steps × strengths, for each prompt", columns=1,
                                           height="auto", object_fit="contain", elem_id="lohatrain_grid_images"))


@dataclasses.dataclass
class CaptionEditorPanel(Panel):
    image: gr.Textbox
    caption: gr.Textbox
    save: gr.Button


def _caption_editor_panel() -> CaptionEditorPanel:
    """One image's caption, chosen by clicking its thumbnail, edited in place."""
    with gr.Row():
        return CaptionEditorPanel(
            image=gr.Textbox("", label="Image", interactive=False, scale=1, elem_id="lohatrain_edit_name"),
            caption=gr.Textbox("", label="Its caption", scale=3, elem_id="lohatrain_edit_caption"),
            save=gr.Button("Save caption", scale=0, min_width=120, elem_id="lohatrain_save_caption"))


@dataclasses.dataclass
class Tab:
    """Every panel: the form on the left, the run and its results on the right."""
    method: MethodPanel
    model: ModelPanel
    network: NetworkPanel
    dataset: DatasetPanel
    tagger: TaggerPanel
    training: TrainingPanel
    developer: DeveloperPanel
    optimizer: OptimizerPanel
    targets: TargetsPanel
    loss: LossPanel
    dataset_options: DatasetOptionsPanel
    previews: PreviewPanel
    resume: ResumePanel
    saved: SavedSettingsPanel
    run: RunPanel
    gallery: GalleryPanel
    grid: GridPanel
    editor: CaptionEditorPanel

    def fields(self, names: list[str]) -> list:
        """The form fields of these settings, in that order, from whichever panels hold them."""
        found = {}
        for f in dataclasses.fields(self):
            for name, component in getattr(self, f.name).settings().items():
                if name in found:
                    raise ValueError(f"two panels have a form field for {name!r}")
                found[name] = component
        return [found[name] for name in names]


def build_tab(runner: JobRunner) -> gr.Blocks:
    """The tab: its panels, then the events between them."""
    with gr.Blocks(analytics_enabled=False) as blocks:
        _wire(runner, lay_out(runner))
    return blocks


def lay_out(runner: JobRunner) -> Tab:
    """The form's panels on the left, the run's on the right (inside a gr.Blocks), the form at the defaults for the
    loaded model and the host: what an untouched form sends."""
    family = actions.loaded_family()
    d = dataclasses.replace(TrainSettings.defaults_for(family), **hosts.current().device_defaults())
    gr.Markdown(INTRO, elem_id="lohatrain_intro")
    with gr.Row(elem_id="lohatrain_tab"):
        with gr.Column(scale=3, elem_id="lohatrain_form"):
            left = dict(method=_method_panel(d), model=_model_panel(),
                        network=_network_panel(d, preset_labels(family)), dataset=_dataset_panel(d),
                        tagger=_tagger_panel(), training=_training_panel(d), developer=_developer_panel(d),
                        optimizer=_optimizer_panel(d), targets=_targets_panel(d), loss=_loss_panel(d),
                        dataset_options=_dataset_options_panel(d), previews=_preview_panel(d),
                        resume=_resume_panel(d), saved=_saved_settings_panel())
        with gr.Column(scale=2, elem_id="lohatrain_side"):
            right = dict(run=_run_panel(runner), gallery=_gallery_panel(), grid=_grid_panel(),
                         editor=_caption_editor_panel())
    tab = Tab(**left, **right)
    for name, rule in APPLIES.items():  # as the events in _wire_applies keep them
        tab.fields([name])[0].visible = rule.when(getattr(d, rule.choice))
    return tab


def _wire(runner: JobRunner, t: Tab) -> None:
    """The events between panels."""
    form, message = t.fields(FIELDS), t.run.message
    thumbs = [t.gallery.thumbs, t.gallery.shown_files]
    model_view = [t.model.summary, t.model.checkpoint, t.method.types]
    _wire_applies(t)
    # The user's pick only: what else sets the preset (the type, a checkpoint, saved settings) sets the sizes too.
    # On `change`, the type's own preset update started this event, and Gradio drops a new one while it is
    # pending: a preset picked right after the type kept the sizes of the type's default preset.
    t.network.network_preset.input(preset_sizes, [t.network.network_preset, t.method.training_method],
                                   t.fields(SIZE_FIELDS), **_LIKE_CHANGE)
    # Likewise the type's defaults follow the user's pick only: saved settings of another type keep their own.
    t.method.training_method.input(method_changed, [t.method.training_method, t.optimizer.optimizer],
                                   t.fields(METHOD_FIELDS), **_LIKE_CHANGE)
    # and the learning rates follow the user's pick of optimizer (saved settings keep their own)
    t.optimizer.optimizer.input(optimizer_changed, [t.optimizer.optimizer, t.method.training_method,
                                                    t.training.learning_rate, t.developer.text_encoder_lr],
                                [t.training.learning_rate, t.developer.text_encoder_lr, t.optimizer.note],
                                **_LIKE_CHANGE)
    # listing files needs no GPU: outside the queue, so it answers at once even while something generates
    t.model.refresh.click(refresh_model, [], [t.model.checkpoint, t.model.summary, t.method.types], queue=False)
    t.model.load.click(load_checkpoint, [t.model.checkpoint, t.method.training_method, t.optimizer.optimizer],
                       [t.model.summary, message, *t.fields(FAMILY_FIELDS)]).then(_model_view, [], model_view)
    run = t.run
    run.poll.click(lambda *v: poll_status(runner, *v), [run.sent_preview, run.shown_model, t.dataset.name],
                   [run.status_json, run.sent_preview, *model_view, run.shown_model], queue=False,
                   show_progress="hidden")
    follows = t.fields(SUGGESTION_FOLLOWS)
    suggest_from, suggested = [t.gallery.images, *follows], [t.gallery.suggestion, t.gallery.apply]
    t.gallery.apply.click(apply_suggestion, suggest_from, [t.training.steps, t.training.learning_rate])
    for field in follows:
        field.change(suggestion, suggest_from, suggested, queue=False)
    t.run.train.click(lambda *v: start_training(runner, *v), form, [message])
    t.run.fit.click(fit_my_card, form, [message, *form])
    t.resume.resume.click(lambda label, anyway: resume_training(runner, label, anyway),
                          [t.resume.run, t.resume.anyway], [message])
    t.run.check.click(check_dataset, t.fields(CHECK_FIELDS), [t.gallery.report, *thumbs, t.gallery.images]).then(
        suggestion, suggest_from, suggested, queue=False)
    tagging = t.tagger
    tagging.caption.click(lambda *v: (yield from caption_dataset(runner, *v)),
                          [t.dataset.dataset_dir, tagging.tagger, tagging.existing, tagging.prefix, tagging.drop_tags,
                           t.dataset.caption_ext, tagging.threshold, tagging.sort_alpha, tagging.use_spaces,
                           tagging.escape], [tagging.message, *thumbs])
    t.grid.make.click(lambda *v: make_grid(runner, *v),
                      [t.dataset.name, t.grid.prompts, t.grid.strengths, t.grid.grid_seed],
                      [t.grid.message, t.grid.images])
    t.gallery.thumbs.select(select_thumbnail, [t.gallery.shown_files], [t.editor.image, t.editor.caption])
    t.editor.save.click(save_edited_caption,
                        [t.dataset.dataset_dir, t.editor.image, t.editor.caption, t.dataset.caption_ext],
                        [message, *thumbs])
    t.saved.save.click(save_preset, [t.saved.save_as, *form], [message, t.saved.saved])
    t.saved.load.click(load_preset, [t.saved.saved], [message, *form])
    kohya = [t.saved.kohya_config, t.saved.kohya_dataset_config]
    for file in kohya:
        file.upload(load_kohya, kohya, [message, *form])


def _wire_applies(t: Tab) -> None:
    """Each choice shows and hides the fields that depend on it (APPLIES), however it changes (the user, saved
    settings). One event per choice, outside the queue: Gradio 3 drops an event's new trigger while it is
    pending, so two choices changed at once must not share one."""
    for choice in dict.fromkeys(rule.choice for rule in APPLIES.values()):
        fields = [name for name, rule in APPLIES.items() if rule.choice == choice]
        component = t.fields([choice])[0]
        component.change(functools.partial(applying, choice, fields), [component], t.fields(fields), queue=False)
