"""What differs in Forge 2 for lohatrain/webui/host.py, which uses it when the host is Forge
(`lohatrain.forge.is_forge_host`, decided at start-up) and makes every call into the WebUI's `modules` itself (this
module imports none). Read off Forge's source (commit dfdcbab):

- the checkpoint is loaded lazily: `shared.sd_model` is a `FakeInitialModel` until `sd_models.forge_model_reload()`
  (which txt2img calls first; it returns at once when the chosen checkpoint is loaded). Choosing a checkpoint is
  `modules_forge.main_entry.checkpoint_change(title)` then that reload: Forge's `sd_models.reload_model_weights`
  does nothing;
- LoRAs are taken off and put back through the UNet patchers (lohatrain.forge.model), not the A1111 `networks`,
  around a run and around the grid's generations; Forge's Lora extension keeps the files it read by name, so a run
  that rewrote one has that cache cleared (`networks.load_lora_state_dict`);
- the text path: `set_clip_skip(n)` on the engine (each text engine keeps `clip_skip`), applied to every family
  (SDXL with at least 2); `opts.emphasis` is read at each call, as in A1111;
- the memory manager moves the VAE and text encoders for a preview by itself.
"""
from __future__ import annotations

from contextlib import contextmanager

from .model import loras_kept, unet_session  # noqa: F401  (for webui/host.py: the grid's LoRAs, the run's UNet)

_TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")
# What the tab offers that Forge cannot do, and why (the tab shows these under the loaded checkpoint).
NOTES = ("In Forge the text encoder is not trained (keep Text encoder LR at 0): Forge runs its whole text path "
         "under torch.inference_mode. Everything else works as in the WebUI.",)


def is_loaded(sd_model) -> bool:
    return hasattr(sd_model, "forge_objects")


def not_loaded_summary(title: str) -> dict:
    return {"name": title or "unknown", "title": title, "hash": "", "family": None, "family_name": None,
            "problem": "Forge loads the checkpoint at the first generation; it is not loaded yet. Generate one "
                       "image, or start training (which loads it), and the model's family shows here."}


@contextmanager
def clip_skip(sd_model, skip: int):
    """The engine's CLIP skip for one encoding (Forge's text engines keep it as `clip_skip`; txt2img sets it from
    the option before every generation)."""
    engines = [getattr(sd_model, name) for name in _TEXT_ENGINES if hasattr(sd_model, name)]
    saved = [engine.clip_skip for engine in engines]
    sd_model.set_clip_skip(skip)
    try:
        yield
    finally:
        for engine, value in zip(engines, saved):
            engine.clip_skip = value
