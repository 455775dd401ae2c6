"""REST routes on the WebUI's FastAPI app; they call the same JobRunner as the tab.

POST /lohatrain/v1/train      body: settings JSON (engine names; what it leaves out: the loaded model family's
                              defaults) → {"job_id"}; 409 busy; 422 every bad value, each naming its field.
                              Or {"resume": "<run name>", "resume_anyway": false, "steps": N}: go on with a
                              stopped run from its state in the Lora folder (its own settings; steps may extend)
POST /lohatrain/v1/preflight  body: as /train → what Train checks, without starting: 422 with every problem, or
                              the memory estimate (lohatrain.memory): {"message" ("needs ≈ 6.9 GB of your 8.0 GB
                              free (model 3.4, …)"), "fits" (null without a GPU), "need_bytes", "free_bytes",
                              "host_bytes", "parts_bytes", "phase", "fit" (when it does not fit: the recipe,
                              {message, fits, need_bytes, free_bytes, settings, steps [{label, settings, need,
                              host_setting}], notes}), "refusal" (why Train would refuse it, or null)}. Train refuses
                              a run that does not fit the GPU unless "ignore_memory_estimate": true
GET  /lohatrain/v1/runs       the stopped runs that can be resumed: name, step, total, model, method, saved_at
POST /lohatrain/v1/settings/import  {"config": a kohya_ss GUI JSON's or an sd-scripts TOML's text, "dataset_config":
                              its dataset config's text (optional)} → {"settings" (engine names: what the config sets,
                              for POST /train), "message", "taken", "changed", "not_taken" [{group, option, value,
                              why}], "quiet"}; starts nothing. 422 when the text is neither
POST /lohatrain/v1/dataset/check  {"dataset_dir", "caption_mode", "caption_ext", "caption_phrase", "resolution",
                              "batch_size", "reg_data_dir", "masked_loss"} → the dataset doctor's report: images,
                              problems [{file, kind, detail, message}], tag_frequency, trigger, suggested_steps,
                              steps_reason, folders [{name, regularization, repeats, images, draws, share, trigger}]
                              (kohya's N_name sub-folders, or the folder itself), regularization_images, masks
POST /lohatrain/v1/grid       {"name", "prompts", "strengths", "seed"} (all but the name optional: the run's preview
                              prompts, 0.5/0.75/1, its preview seed) → the steps × strength grid through the WebUI's
                              txt2img: {"files", "images" (base64 PNG, one per prompt), "columns", "rows", "prompts"}
GET  /lohatrain/v1/status     state idle|running|done|error|interrupted, step, total, loss, ETA, message,
                              file_name, preview_url (never a server path), the chart's losses, smooth_losses and
                              loss_steps
POST /lohatrain/v1/interrupt  → {"interrupted": bool}: the training, or else a captioning pass or grid
GET  /lohatrain/v1/presets    ?method=lora|locon|loha|lokr: that type's presets for the loaded model's family
                              (sizes, fp16 file MB)
GET  /lohatrain/v1/preview    the latest preview image (PNG)

Who may call them: the routes are added the way the WebUI's own `Api.add_api_route` adds /sdapi/v1/* (v1.10.1
modules/api/api.py): with `--api-auth` every call needs those HTTP Basic credentials. Unlike the WebUI's own
routes they also refuse everyone else while the WebUI is reachable from the network without `--api-auth`,
except the tab's own page when it is behind `--gradio-auth` (its login cookie) or when an administrator
allows it in Settings → LoRA training.
"""
from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from .. import doctor, memory
from ..errors import LohatrainError
from ..jobs import Busy, JobRunner
from .. import hosts
from ..methods import TYPES
from ..settings import SettingsError, TrainSettings
from . import actions

PREFIX = "/lohatrain/v1"


def caller_guard(app: FastAPI):
    """The dependency every route carries (see the module's doc for the rule)."""
    basic = HTTPBasic(auto_error=False)

    def guard(request: Request, credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        refusal = actions.api_refusal(credentials and (credentials.username, credentials.password),
                                   logged_in_to_tab=_logged_in(app, request))
        if refusal is not None:
            status, message = refusal
            headers = {"WWW-Authenticate": "Basic"} if status == 401 else None
            raise HTTPException(status_code=status, detail=[message], headers=headers)

    return guard


def _logged_in(app, request: Request) -> bool:
    """A request from the WebUI page of a user logged in through --gradio-auth (Gradio's own session cookie)."""
    tokens = getattr(app, "tokens", None)
    if not getattr(app, "auth", None) or not tokens:
        return False
    suffix = f"-{app.cookie_id}" if getattr(app, "cookie_id", None) else ""  # Gradio 4 (Forge) names them per app
    token = request.cookies.get(f"access-token{suffix}") or request.cookies.get(f"access-token-unsecure{suffix}")
    return token is not None and token in tokens


def _refuse(problems: list[str], status_code: int = 422) -> JSONResponse:
    """The answer to a call that cannot be done: every problem at once, as FastAPI lists its own."""
    return JSONResponse({"detail": problems}, status_code=status_code)


def _settings_of(body: dict) -> TrainSettings:
    """A run's settings from a request: what it leaves out, the loaded model family's and the device's defaults."""
    host = hosts.current()
    return TrainSettings.from_dict({**host.device_defaults(), **body, "output_dir": str(host.lora_dir())},
                                   family=actions.loaded_family())


def _unknown(body: dict, known) -> list[str]:
    return [f"unknown field {k!r}" for k in sorted(set(body) - set(known))]


_TYPE_WORDS = {str: "a text", int: "a whole number", bool: "true or false"}


def _mistyped(body: dict, known: dict) -> list[str]:
    """The known fields given with another JSON type (true/false is not a number here, nor a number true/false)."""
    return [k for k, t in known.items()
            if k in body and (not isinstance(body[k], t) or isinstance(body[k], bool) != (t is bool))]


class Routes:
    """The route handlers: each does what one call asks of the shared JobRunner and the host (actions.py)."""

    def __init__(self, runner: JobRunner):
        self.runner = runner

    def start(self, body=Body(...)):
        """A new run from settings (the loaded family's defaults fill the rest), or a stopped run resumed."""
        if not isinstance(body, dict):
            return _refuse(["the body must be a JSON object of settings"])
        try:
            job_id = self._resume(body) if "resume" in body else self._train(body)
        except SettingsError as e:
            return _refuse(e.problems)
        except Busy as e:
            return _refuse([str(e)], 409)
        except LohatrainError as e:
            return _refuse([str(e)])
        return {"job_id": job_id, "state": "running"}

    def check_run(self, body=Body(...)):
        """What Train would check and the memory estimate, without starting."""
        if not isinstance(body, dict):
            return _refuse(["the body must be a JSON object of settings"])
        try:
            settings = _settings_of(body)
            est = actions.memory_estimate(settings, via="api")
        except SettingsError as e:
            return _refuse(e.problems)
        except LohatrainError as e:
            return _refuse([str(e)])
        return {**est.to_dict(), "refusal": memory.refusal(est, settings)}

    def _train(self, body: dict) -> str:
        return self.runner.start(actions.preflight(_settings_of(body), via="api"), via="api")

    def _resume(self, body: dict) -> str:
        """A resumed run keeps its own settings: only how far it goes (steps) may change."""
        problems = [f"a resumed run keeps its own settings: {k!r} cannot be given with resume"
                    for k in sorted(set(body) - {"resume", "resume_anyway", "steps"})]
        if not isinstance(body.get("resume_anyway", False), bool):
            problems.append("resume_anyway must be true or false")
        steps = body.get("steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            problems.append("steps must be a whole number of at least 1")
        if problems:
            raise SettingsError(problems)
        settings, saved = actions.resume_settings(body["resume"], steps)
        return self.runner.start(actions.preflight(settings, via="api", resuming=True), via="api", resume=saved,
                                 resume_anyway=body.get("resume_anyway", False))

    def runs(self):
        return {"runs": actions.resumable_runs()}

    def import_settings(self, body=Body(...)):
        """A kohya config as settings, and where each of its options went; nothing is started."""
        known = {"config": str, "dataset_config": str}
        if not isinstance(body, dict):
            return _refuse(["the body must be a JSON object"])
        problems = _unknown(body, known) + [f"{k} must be {_TYPE_WORDS[known[k]]}" for k in _mistyped(body, known)]
        if "config" not in body:
            problems.append("config (the kohya config file's text) is required")
        if problems:
            return _refuse(problems)
        try:
            imported = actions.import_kohya(body["config"], body.get("dataset_config"), via="api")
        except LohatrainError as e:
            return _refuse(e.problems if isinstance(e, SettingsError) else [str(e)])
        return {"settings": imported.settings, "message": imported.message(), "taken": imported.taken,
                "changed": imported.changed, "not_taken": [dataclasses.asdict(n) for n in imported.not_taken],
                "quiet": imported.quiet}

    def check_dataset(self, body=Body(...)):
        """The dataset doctor's report, before anything is trained."""
        known = {"dataset_dir": str, "caption_mode": str, "caption_ext": str, "caption_phrase": str,
                 "resolution": int, "batch_size": int, "reg_data_dir": str, "masked_loss": bool}
        if not isinstance(body, dict):
            return _refuse(["the body must be a JSON object"])
        problems = _unknown(body, known) + [f"{k} must be {_TYPE_WORDS[known[k]]}" for k in _mistyped(body, known)]
        if problems:
            return _refuse(problems)
        try:
            actions.check_dataset_path(body.get("dataset_dir", ""), via="api")
            if body.get("reg_data_dir", "").strip():
                actions.check_dataset_path(body["reg_data_dir"], via="api")
            report = doctor.check(body.get("dataset_dir", ""), body.get("caption_mode", "txt"),
                                  body.get("caption_ext", ".txt"), body.get("caption_phrase", ""),
                                  body.get("resolution", 512), body.get("batch_size", 1),
                                  reg_data_dir=body.get("reg_data_dir", ""),
                                  masked_loss=body.get("masked_loss", False))
        except (LohatrainError, ValueError) as e:
            return _refuse([str(e)])
        return report.to_dict()

    def make_grid(self, body=Body(...)):
        """The steps × strength grid of a finished run, the PNGs inline (a caller may not reach the disk)."""
        known = {"name": (str,), "prompts": (list,), "strengths": (list,), "seed": (int,)}
        if not isinstance(body, dict):
            return _refuse(["the body must be a JSON object"])
        problems = _unknown(body, known) + [f"{k} has the wrong type" for k in _mistyped(body, known)]
        if "name" not in body:
            problems.append("name (the trained file's name) is required")
        if problems:
            return _refuse(problems)
        if self.runner.job is not None and self.runner.job.state == "running":
            return _refuse(["a training is running: make the grid when it has finished"], 409)
        try:
            made = actions.make_grid(body["name"], body.get("prompts"), body.get("strengths"), body.get("seed"))
        except LohatrainError as e:
            return _refuse([str(e)])
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in made.files]  # the PNGs as saved
        return {"files": [f.name for f in made.files], "images": encoded, "prompts": made.plan.prompts,
                "columns": [c.label for c in made.plan.columns], "rows": made.plan.strengths}

    def status(self):
        return public_status(self.runner.status())

    def interrupt(self):
        """Stops the training, or else what the host is doing for us (a captioning pass, a grid)."""
        return {"interrupted": self.runner.interrupt() or actions.interrupt_task()}

    def presets(self, method: str = "loha"):
        family = actions.loaded_family()
        if method not in TYPES:
            return _refuse([f"method must be one of {', '.join(TYPES)}"])
        return {key: {"label": p.label, "dim": p.dim, "alpha": p.alpha, "conv_dim": p.conv_dim,
                      "conv_alpha": p.conv_alpha, "lokr_factor": p.factor, "file_mb": p.file_mb, "family": family,
                      "training_method": method}
                for key, p in TYPES[method].presets[family].items()}

    def preview(self):
        job = self.runner.job
        if job is None or not job.preview or not Path(job.preview).is_file():
            return _refuse(["no preview yet"], 404)
        return FileResponse(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})


def register(app: FastAPI, runner: JobRunner) -> None:
    """Adds the routes, each behind the caller guard."""
    r, guard = Routes(runner), [Depends(caller_guard(app))]
    for method, path, handler in [("POST", "/train", r.start), ("POST", "/preflight", r.check_run),
                                  ("GET", "/status", r.status), ("GET", "/runs", r.runs),
                                  ("POST", "/dataset/check", r.check_dataset), ("POST", "/grid", r.make_grid),
                                  ("POST", "/interrupt", r.interrupt), ("GET", "/presets", r.presets),
                                  ("POST", "/settings/import", r.import_settings),
                                  ("GET", "/preview", r.preview)]:
        app.add_api_route(f"{PREFIX}{path}", handler, methods=[method], dependencies=guard)


def public_status(data: dict) -> dict:
    """The job's status without server paths: the file by its name, the preview by its URL."""
    data = dict(data)
    file, preview = data.pop("file", None), data.pop("preview", None)
    data["file_name"] = Path(file).name if file else None
    data["preview_url"] = f"{PREFIX}/preview?step={data['preview_step']}" if preview else None
    return data
