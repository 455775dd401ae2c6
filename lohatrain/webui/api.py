"""REST routes on the WebUI's FastAPI app; they call the same JobRunner as the tab.

POST /lohatrain/v1/train      body: settings JSON (engine names; what it leaves out: the loaded model family's
                              defaults) → {"job_id"}; 409 busy; 422 every bad value, each naming its field.
                              Or {"resume": "<run name>", "resume_anyway": false, "steps": N}: go on with a
                              stopped run from its state in the Lora folder (its own settings; steps may extend)
POST /lohatrain/v1/preflight  body: as /train → what Train checks, without starting: 422 with every problem, or
                              the memory estimate (lohatrain.memory): {"message" ("needs ≈ 6.9 GB of your 8.0 GB
                              free (model 3.4, …)"), "fits" (null without a GPU), "need_bytes", "free_bytes",
                              "host_bytes", "parts_bytes", "phase", "changes" [{label, settings, need}] (what would
                              fit, when it does not), "refusal" (why Train would refuse it, or null)}. Train refuses a
                              run that does not fit the GPU unless "ignore_memory_estimate": true
GET  /lohatrain/v1/runs       the stopped runs that can be resumed: name, step, total, model, method, saved_at
POST /lohatrain/v1/dataset/check  {"dataset_dir", "caption_mode", "caption_ext", "caption_phrase", "resolution",
                              "batch_size"} → the dataset doctor's report: images, problems [{file, kind,
                              message}], tag_frequency, trigger, suggested_steps, steps_reason
POST /lohatrain/v1/grid       {"name", "prompts", "strengths", "seed"} (all but the name optional: the run's preview
                              prompts, 0.5/0.75/1, its preview seed) → the steps × strength grid through the WebUI's
                              txt2img: {"files", "images" (base64 PNG, one per prompt), "columns", "rows", "prompts"}
GET  /lohatrain/v1/status     state idle|running|done|error|interrupted, step, total, loss, ETA, message,
                              file_name, preview_url (never a server path)
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


def _settings_of(body: dict) -> TrainSettings:
    """A run's settings from a request: what it leaves out, the loaded model family's and the device's defaults."""
    host = hosts.current()
    return TrainSettings.from_dict({**host.device_defaults(), **body, "output_dir": str(host.lora_dir())},
                                   family=actions.loaded_family())


def register(app: FastAPI, runner: JobRunner) -> None:
    route = dict(dependencies=[Depends(caller_guard(app))])

    def start(body=Body(...)):
        if not isinstance(body, dict):
            return JSONResponse({"detail": ["the body must be a JSON object of settings"]}, status_code=422)
        try:
            if "resume" in body:
                job_id = _resume(body)
            else:
                job_id = runner.start(actions.preflight(_settings_of(body), via="api"), via="api")
        except SettingsError as e:
            return JSONResponse({"detail": e.problems}, status_code=422)
        except Busy as e:
            return JSONResponse({"detail": [str(e)]}, status_code=409)
        except LohatrainError as e:
            return JSONResponse({"detail": [str(e)]}, status_code=422)
        return {"job_id": job_id, "state": "running"}

    def check_run(body=Body(...)):
        if not isinstance(body, dict):
            return JSONResponse({"detail": ["the body must be a JSON object of settings"]}, status_code=422)
        try:
            settings = _settings_of(body)
            est = actions.memory_estimate(settings, via="api")
        except SettingsError as e:
            return JSONResponse({"detail": e.problems}, status_code=422)
        except LohatrainError as e:
            return JSONResponse({"detail": [str(e)]}, status_code=422)
        return {**est.to_dict(), "refusal": memory.refusal(est, settings)}

    def _resume(body: dict) -> str:
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
        return runner.start(actions.preflight(settings, via="api", resuming=True), via="api", resume=saved,
                            resume_anyway=body.get("resume_anyway", False))

    def runs():
        return {"runs": actions.resumable_runs()}

    def check_dataset(body=Body(...)):
        known = {"dataset_dir": str, "caption_mode": str, "caption_ext": str, "caption_phrase": str,
                 "resolution": int, "batch_size": int}
        if not isinstance(body, dict):
            return JSONResponse({"detail": ["the body must be a JSON object"]}, status_code=422)
        problems = [f"unknown field {k!r}" for k in sorted(set(body) - set(known))] + [
            f"{k} must be {'a whole number' if t is int else 'a text'}" for k, t in known.items()
            if k in body and (not isinstance(body[k], t) or isinstance(body[k], bool))]
        if problems:
            return JSONResponse({"detail": problems}, status_code=422)
        try:
            actions.check_dataset_path(body.get("dataset_dir", ""), via="api")
            report = doctor.check(body.get("dataset_dir", ""), body.get("caption_mode", "txt"),
                                  body.get("caption_ext", ".txt"), body.get("caption_phrase", ""),
                                  body.get("resolution", 512), body.get("batch_size", 1))
        except (LohatrainError, ValueError) as e:
            return JSONResponse({"detail": [str(e)]}, status_code=422)
        return report.to_dict()

    def make_grid(body=Body(...)):
        known = {"name": (str,), "prompts": (list,), "strengths": (list,), "seed": (int,)}
        if not isinstance(body, dict):
            return JSONResponse({"detail": ["the body must be a JSON object"]}, status_code=422)
        problems = [f"unknown field {k!r}" for k in sorted(set(body) - set(known))] + [
            f"{k} has the wrong type" for k, t in known.items()
            if k in body and (not isinstance(body[k], t) or isinstance(body[k], bool))]
        if "name" not in body:
            problems.append("name (the trained file's name) is required")
        if problems:
            return JSONResponse({"detail": problems}, status_code=422)
        if runner.job is not None and runner.job.state == "running":
            return JSONResponse({"detail": ["a training is running: make the grid when it has finished"]},
                                status_code=409)
        try:
            made = actions.make_grid(body["name"], body.get("prompts"), body.get("strengths"), body.get("seed"))
        except LohatrainError as e:
            return JSONResponse({"detail": [str(e)]}, status_code=422)
        encoded = [base64.b64encode(f.read_bytes()).decode() for f in made.files]  # the PNGs as saved
        return {"files": [f.name for f in made.files], "images": encoded, "prompts": made.plan.prompts,
                "columns": [c.label for c in made.plan.columns], "rows": made.plan.strengths}

    def status():
        return public_status(runner.status())

    def interrupt():
        return {"interrupted": runner.interrupt() or actions.interrupt_task()}

    def presets(method: str = "loha"):
        family = actions.loaded_family()
        if method not in TYPES:
            return JSONResponse({"detail": [f"method must be one of {', '.join(TYPES)}"]},
                                status_code=422)
        return {key: {"label": p.label, "dim": p.dim, "alpha": p.alpha, "conv_dim": p.conv_dim,
                      "conv_alpha": p.conv_alpha, "lokr_factor": p.factor, "file_mb": p.file_mb, "family": family,
                      "training_method": method}
                for key, p in TYPES[method].presets[family].items()}

    def preview():
        job = runner.job
        if job is None or not job.preview or not Path(job.preview).is_file():
            return JSONResponse({"detail": ["no preview yet"]}, status_code=404)
        return FileResponse(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    app.add_api_route(f"{PREFIX}/train", start, methods=["POST"], **route)
    app.add_api_route(f"{PREFIX}/preflight", check_run, methods=["POST"], **route)
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"], **route)
    app.add_api_route(f"{PREFIX}/runs", runs, methods=["GET"], **route)
    app.add_api_route(f"{PREFIX}/dataset/check", check_dataset, methods=["POST"], **route)
    app.add_api_route(f"{PREFIX}/grid", make_grid, methods=["POST"], **route)
    app.add_api_route(f"{PREFIX}/interrupt", interrupt, methods=["POST"], **route)
    app.add_api_route(f"{PREFIX}/presets", presets, methods=["GET"], **route)
    app.add_api_route(f"{PREFIX}/preview", preview, methods=["GET"], **route)


def public_status(data: dict) -> dict:
    """The job's status without server paths: the file by its name, the preview by its URL."""
    data = dict(data)
    file, preview = data.pop("file", None), data.pop("preview", None)
    data["file_name"] = Path(file).name if file else None
    data["preview_url"] = f"{PREFIX}/preview?step={data['preview_step']}" if preview else None
    return data
