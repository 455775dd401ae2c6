"""`modules.shared_items`: the checkpoint list's two helpers (the host's modules/shared_items.py, the same in Forge),
which Forge's top bar calls (tests/forge_host_stub/modules_forge/main_entry.py).

Ports modules/shared_items.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""


def list_checkpoint_tiles(use_short=False):
    import modules.sd_models
    return modules.sd_models.checkpoint_tiles(use_short)


def refresh_checkpoints():
    import modules.sd_models
    return modules.sd_models.list_models()
