"""One training at a time for the whole WebUI, shared by the tab and the REST API.

A job goes idle → running → done | error | interrupted. It runs in its own thread so that a REST call
answers at once and the tab can poll; `status()` is a plain dict, the same one `GET /lohatrain/v1/status`
returns.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LohatrainError
from .preflight import Prepared
from .settings import TrainSettings
from .trainer import Progress, TrainResult

log = logging.getLogger("lohatrain")

MAX_CHART_POINTS = 400


class Busy(LohatrainError):
    """A training is already running."""


@dataclass
class Job:
    """What a running training reports, and how it is asked to stop."""

    id: str
    prepared: Prepared  # what the click's preflight checked: the run trains exactly this
    via: str = "tab"  # "tab" or "api": which password protects the caller (the path rule differs)
    state: str = "running"
    progress: Progress = field(default_factory=lambda: Progress("Waiting for the WebUI's other jobs"))
    losses: list[float] = field(default_factory=list)  # every step's loss, for the chart
    smooth_losses: list[float] = field(default_factory=list)  # the smoothed loss at each of those steps
    loss_steps: list[int] = field(default_factory=list)  # their step numbers (a resumed run starts past 1)
    message: str = ""
    file: str | None = None
    activation_text: str = ""
    preview: str | None = None
    preview_step: int = 0
    preview_prompt: str = ""
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: float | None = None  # when it finished, failed or was interrupted: the elapsed time stops there
    stop_requested: threading.Event = field(default_factory=threading.Event)
    resume: object = None  # a lohatrain.run_state.SavedRun to go on from
    resume_anyway: bool = False
    # Guards the fields a poller reads together: the final state never shows without its message and file.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def settings(self) -> TrainSettings:
        return self.prepared.settings

    def report(self, progress: Progress) -> None:
        if progress.stage == "Training" and progress.loss is not None:
            self.losses.append(progress.loss)
            self.smooth_losses.append(progress.smooth_loss)
            self.loss_steps.append(progress.step)
        elif progress.step:  # "Saving" after the last step: keep showing the last step's figures
            progress = dataclasses.replace(self.progress, stage=progress.stage, eta_s=0.0)
        self.progress = progress

    def should_stop(self) -> bool:
        return self.stop_requested.is_set()

    def set_preview(self, path: Path, step: int, prompt: str = "") -> None:
        self.preview, self.preview_step, self.preview_prompt = str(path), step, prompt


RunFn = Callable[[Job], TrainResult]


class JobRunner:
    def __init__(self, run: RunFn):
        self._run = run
        self._lock = threading.Lock()
        self.job: Job | None = None
        self._thread: threading.Thread | None = None

    def start(self, prepared: Prepared, via: str = "tab", resume=None, resume_anyway: bool = False) -> str:
        """Start training (or resume a stopped run) in the background; raises Busy while another one runs."""
        with self._lock:
            self.check_idle()
            self.job = Job(uuid.uuid4().hex[:12], prepared, via, resume=resume, resume_anyway=resume_anyway)
            self._thread = threading.Thread(target=self._work, args=(self.job,), name="lohatrain", daemon=True)
            self._thread.start()
            return self.job.id

    def check_idle(self) -> None:
        """Raise Busy while a training runs."""
        if self.job is not None and self.job.state == "running":
            raise Busy(f"a training ({self.job.settings.name}) is already running: wait for it to finish "
                       "or interrupt it")

    def _work(self, job: Job) -> None:
        outcome = {}
        try:
            result = self._run(job)
            outcome = dict(file=str(result.file) if result.file else None, warnings=result.warnings,
                           activation_text=result.activation_text,
                           state=result.status,
                           progress=dataclasses.replace(job.progress, stage=result.status.capitalize()))
            if result.status == "interrupted":
                outcome["message"] = (f"Interrupted after {result.steps_done} steps; saved {result.file.name}. "
                                      "It can be resumed (Resume a stopped run)."
                                      if result.file else "Interrupted before the first step; nothing was saved.")
            else:
                outcome["message"] = f"Done: {result.steps_done} steps in {result.seconds:.0f}s, seed {result.seed}."
        except LohatrainError as e:
            outcome = dict(state="error", message=str(e))
        except Exception as e:  # anything else is our bug or the host's: say so, keep the WebUI running
            log.error("lohatrain: training failed\n%s", traceback.format_exc())
            outcome = dict(state="error", message=f"Training failed with an unexpected error: {type(e).__name__}: {e}")
        finally:
            with job.lock:  # the state last: a reader without the lock still never sees it before its message
                state = outcome.pop("state", "error")
                for name, value in outcome.items():
                    setattr(job, name, value)
                job.ended = time.time()
                job.state = state

    def interrupt(self) -> bool:
        job = self.job
        if job is None or job.state != "running":
            return False
        job.stop_requested.set()
        return True

    def status(self) -> dict:
        job = self.job
        if job is None:
            return {"state": "idle"}
        with job.lock:
            return self._snapshot(job)

    @staticmethod
    def _snapshot(job: Job) -> dict:
        p = job.progress
        return {
            "state": job.state, "job_id": job.id, "name": job.settings.name, "stage": p.stage,
            "step": p.step, "total": p.total or job.settings.steps, "loss": p.loss, "smooth_loss": p.smooth_loss,
            "lr": p.lr, "it_per_s": p.it_per_s, "eta_s": p.eta_s, "message": job.message, "file": job.file,
            "activation_text": job.activation_text,
            "preview": job.preview, "preview_step": job.preview_step, "preview_prompt": job.preview_prompt,
            "warnings": job.warnings, "losses": _downsample(job.losses, MAX_CHART_POINTS),
            "smooth_losses": _downsample(job.smooth_losses, MAX_CHART_POINTS),
            "loss_steps": _chart_steps(job.loss_steps, MAX_CHART_POINTS),
            "elapsed_s": (job.ended or time.time()) - job.started,
        }


def _downsample(values: list[float], n: int) -> list[float]:
    """At most n points for the chart: means of equal runs, so the curve keeps its shape."""
    if len(values) <= n:
        return list(values)
    size = len(values) / n
    return [sum(chunk) / len(chunk) for chunk in
            (values[int(i * size):max(int((i + 1) * size), int(i * size) + 1)] for i in range(n))]


def _chart_steps(steps: list[int], n: int) -> list[float]:
    """The step of each chart point (the mean of its run), the first and last at their own steps: the ends of the
    chart's step axis are the run's."""
    points = _downsample(steps, n)
    if points:
        points[0], points[-1] = steps[0], steps[-1]
    return points
