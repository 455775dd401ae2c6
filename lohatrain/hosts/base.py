"""What a host (the program holding the model: AUTOMATIC1111's WebUI, Forge, reForge) gives lohatrain.

The engine needs the loaded model as `ModelParts` and a session in which nothing the host applied is on it; the tab
and the REST routes need the WebUI's services around it. A new host is one file in this folder with a class that
implements these methods, and one line in `hosts/__init__.py` that recognises it at start-up. Only the files in
this folder import a host's own modules.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

from ..parts import ModelParts
from ..settings import TrainSettings

LoadUnet = Callable[[], None]


class Host:
    name = "host"
    notes: tuple[str, ...] = ()  # what the tab offers that this host cannot do, and why (shown under the model)
    # Where the user turns on the host's FP8 storage of the frozen weights, as the memory estimate counts it (every
    # Linear and Conv2d outside the VAE in float8), for "Fit my card" to name; None: no such option here.
    fp8_setting: str | None = None

    # --- the loaded model ---------------------------------------------------------------------------------------
    def model_summary(self) -> dict:
        """The tab's model line: name, title (the choice as checkpoint_titles names it), hash, family label and name,
        or the problem that stops training. The tab asks again while it is shown: a run or a generation may load
        another model."""
        raise NotImplementedError

    def is_loaded(self) -> bool:
        """Whether a model is loaded now (Forge loads one only for the first generation or run)."""
        return True

    def parts(self) -> ModelParts:
        """The loaded model as the engine sees it (a host that loads lazily loads it here); refuses what cannot
        be trained, naming it."""
        raise NotImplementedError

    def session(self, parts: ModelParts) -> AbstractContextManager[LoadUnet | None]:
        """For one run: everything the host applied to the model is off (the last generation's LoRAs on the UNet and
        the text encoders, its memory manager's placement) and back afterwards. Yields a `load_unet` when the
        host's memory manager moves the parts itself (the trainer calls it after every preview)."""
        raise NotImplementedError

    def loras_kept(self) -> AbstractContextManager[None]:
        """Around lohatrain's own `<lora:…>` generations (the grid): the host's LoRA state as found afterwards."""
        raise NotImplementedError

    def checkpoint_titles(self) -> list[str]:
        """The checkpoints the user can choose, as the host's own checkpoint list shows them."""
        raise NotImplementedError

    def load_checkpoint(self, title: str) -> None:
        """Load another checkpoint through the host's own loader."""
        raise NotImplementedError

    def check_memory_mode(self) -> None:
        """Refuse a run the host's memory options make impossible (layers moved inside each forward)."""

    # --- generation -----------------------------------------------------------------------------------------
    def txt2img(self, prompt: str, settings: TrainSettings, seed: int, extra_networks: bool) -> list:
        """Images through the host's own txt2img (previews, the grid), at the run's size, sampler and steps."""
        raise NotImplementedError

    def sampler_names(self) -> list[str]:
        """The samplers the host's txt2img offers."""
        raise NotImplementedError

    def check_sampler(self, name: str) -> None:
        """Refuse a sampler the host's txt2img does not have, before a run or grid starts."""
        raise NotImplementedError

    def prepare_preview(self, parts: ModelParts) -> AbstractContextManager[None]:
        """What txt2img needs during a run that the trainer moved away (the VAE, the text encoders)."""
        raise NotImplementedError

    # --- the WebUI around it ------------------------------------------------------------------------------------
    def register_settings(self) -> None:
        """lohatrain's section in the host's Settings."""
        raise NotImplementedError

    def gpu_queue(self) -> AbstractContextManager:
        """One GPU job at a time, shared with the host's own generations."""
        raise NotImplementedError

    @property
    def state(self):
        """The host's progress bar, live preview, Interrupt and Skip (A1111's `shared.state` API)."""
        raise NotImplementedError

    def lora_dir(self) -> Path:
        """Where trained files go: the host's Lora folder (and lohatrain's sub-folder setting)."""
        raise NotImplementedError

    def refresh_loras(self) -> None:
        """The host's Lora list (and any cache of files it read) after a run wrote or rewrote files."""
        raise NotImplementedError

    def clip_skip(self) -> int:
        """The host's CLIP-skip setting, which a run uses unless it sets its own."""
        raise NotImplementedError

    def option(self, name: str, default=None):
        """One of the host's settings (lohatrain's own section included)."""
        raise NotImplementedError

    def device_defaults(self) -> dict:
        """Setting defaults that depend on where the host computes (fp32 on a CPU)."""
        raise NotImplementedError

    def access(self) -> dict:
        """How the host is reachable: {"exposed": on the network, "gradio_auth": …, "api_auth": …, "root": its
        folder}, for the path and REST rules (lohatrain.webui.access)."""
        raise NotImplementedError

    def tagger(self, which: str, tag_options: dict) -> AbstractContextManager[Callable]:
        """The host's DeepBooru or interrogator as an image → caption function, loaded once for a pass."""
        raise NotImplementedError

    def tag_options(self) -> dict:
        """The host's own tagging options (threshold, sorting, escaping), the tab's starting values."""
        raise NotImplementedError

    def label_grid(self, cells: list, columns: list[str], rows: list[str]):
        """One picture of the grid's cells, labelled the way the host's X/Y/Z plot labels its own."""
        raise NotImplementedError
