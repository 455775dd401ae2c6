"""Every file a run writes, in one place: the network every N steps, the final file with its sidecars, and the
run's state beside them, which is always written before the file it belongs to (every file on disk then has its
run's state at its step or later, so any of them resumes, whenever the process is killed)."""
from __future__ import annotations

import logging
from pathlib import Path

from . import dataset as ds
from . import optimizers, run_state
from .loop import LoopState
from .output import SAVE_DTYPES, build_metadata, save_network, write_sidecars
from .parts import ModelParts
from .preflight import Prepared
from .run_state import RunRecord

log = logging.getLogger("lohatrain")


class Saves:
    def __init__(self, prepared: Prepared, parts: ModelParts, record: RunRecord, loop: LoopState,
                 clip_skip: int | None, bucket_of: list, processes: int, changes: list[str], resumed: bool):
        self.settings, self.plan, self.items = prepared.settings, prepared.plan, prepared.items
        self.parts, self.record, self.loop, self.clip_skip, self.processes = parts, record, loop, clip_skip, processes
        self.changes = changes
        self.overwrite = self.settings.overwrite or resumed  # a resumed run rewrites its own files
        draws = ds.draws_per_epoch(self.items)
        self.folders = ds.folder_counts(self.items, draws)
        self.bucket_counts = dict(ds.bucket_table(self.items, bucket_of, draws))
        self.files: list[Path] = []

    def metadata(self, steps_done: int) -> dict[str, str]:
        extra = optimizers.run_metadata(self.loop.optimizer)
        if self.changes:
            extra["lohatrain_resumed_with_changes"] = "; ".join(self.changes)
        return build_metadata(
            self.settings, family_metadata=self.parts.metadata, model_name=self.parts.name,
            model_hash=self.parts.hash, clip_skip=self.clip_skip, folders=self.folders,
            bucket_counts=self.bucket_counts, steps_done=steps_done,
            started_at=self.record.started_at, batches_per_epoch=self.loop.sampler.batches_per_epoch,
            seed=self.record.seed, processes=self.processes, extra=extra)

    def state(self, streams: dict | None = None) -> None:
        run_state.write_state(self.plan.state_file, self.loop, self.record, streams=streams,
                              extra={"resumed_with_changes": self.changes} if self.changes else None)

    def periodic(self, step: int) -> None:
        """`<name>-<step>.safetensors` every `save_every_steps` steps (not at the last: that is the final file)."""
        every = self.settings.save_every_steps
        if every and step % every == 0 and step < self.settings.steps:
            self.state()
            self.files.append(self._network(self.plan.intermediate(step), self.metadata(step)))

    def final(self, status: str, activation_text: str) -> tuple[Path, dict[str, str]]:
        """The finished (or interrupted) network, its settings and card; its state is kept when it can go on."""
        step, settings = self.loop.step, self.settings
        metadata = self.metadata(step)
        keep_state = status == "interrupted" or settings.keep_state
        if keep_state:
            self.state()
        final = self._network(self.plan.final, metadata)
        self.files.append(final)
        write_sidecars(self.plan, settings, self.record.seed, activation_text=activation_text,
                       notes=f"Trained with lohatrain on {self.parts.name}, {step} steps, seed {self.record.seed}.",
                       sd_version=self.parts.family.card_version)
        if not keep_state:
            self.plan.state_file.unlink(missing_ok=True)
        return final, metadata

    def after_failure(self, streams: dict) -> None:
        """What was trained up to the last whole step, resumable; the original error is what the user must see, so
        a failed save here is only logged."""
        try:
            self.state(streams)
        except Exception:
            log.exception("lohatrain: could not save the run's state after an error")

    def _network(self, path: Path, metadata: dict[str, str]) -> Path:
        tensors = self.loop.network.file_tensors(SAVE_DTYPES[self.settings.save_dtype])
        return save_network(path, tensors, metadata, overwrite=self.overwrite)
