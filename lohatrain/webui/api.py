"""REST routes on the WebUI's FastAPI app; they call the same JobRunner as the tab.

POST /lohatrain/v1/train      body: settings JSON (engine names; what it leaves out: the loaded model family's
                              defaults) → {"job_id"}; 409 busy; 422 every bad value
GET  /lohatrain/v1/status     state idle|running|done|error|interrupted, step, total, loss, ETA, message, preview
POST /lohatrain/v1/interrupt  → {"interrupted": bool}
GET  /lohatrain/v1/presets    the network presets for the loaded model's family (sizes, fp16 file MB)
GET  /lohatrain/v1/preview    the latest preview image (PNG)
"""
from __future__ import annotations

from pathlib import Path

from fastapi import Body, FastAPI
from fastapi.responses import FileResponse, JSONResponse

from ..errors import LohatrainError
from ..jobs import Busy, JobRunner
from ..settings import PRESETS_BY_FAMILY, SettingsError, TrainSettings
from . import host

PREFIX = "/lohatrain/v1"


def register(app: FastAPI, runner: JobRunner) -> None:
    @app.post(f"{PREFIX}/train")
    def start(body: dict = Body(...)):
        if not isinstance(body, dict):
            return JSONResponse({"detail": ["the body must be a JSON object of settings"]}, status_code=422)
        try:
            settings = TrainSettings.from_dict({**body, "output_dir": str(host.lora_dir())},
                                               family=host.loaded_family())
            host.check_dataset_path(settings.dataset_dir)
            host.check_memory_mode()
            host.check_model()
            job_id = runner.start(settings)
        except SettingsError as e:
            return JSONResponse({"detail": e.problems}, status_code=422)
        except Busy as e:
            return JSONResponse({"detail": [str(e)]}, status_code=409)
        except LohatrainError as e:
            return JSONResponse({"detail": [str(e)]}, status_code=422)
        return {"job_id": job_id, "state": "running"}

    @app.get(f"{PREFIX}/status")
    def status():
        data = runner.status()
        if data.get("preview"):
            data["preview_url"] = f"{PREFIX}/preview?step={data['preview_step']}"
        if data.get("file"):
            data["file_name"] = Path(data["file"]).name
        return data

    @app.post(f"{PREFIX}/interrupt")
    def interrupt():
        return {"interrupted": runner.interrupt()}

    @app.get(f"{PREFIX}/presets")
    def presets():
        family = host.loaded_family()
        return {key: {"label": p.label, "dim": p.dim, "alpha": p.alpha, "conv_dim": p.conv_dim,
                      "conv_alpha": p.conv_alpha, "file_mb": p.file_mb, "family": family}
                for key, p in PRESETS_BY_FAMILY[family].items()}

    @app.get(f"{PREFIX}/preview")
    def preview():
        job = runner.job
        if job is None or not job.preview or not Path(job.preview).is_file():
            return JSONResponse({"detail": ["no preview yet"]}, status_code=404)
        return FileResponse(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})
