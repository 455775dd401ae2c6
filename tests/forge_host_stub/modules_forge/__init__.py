"""Forge 2's `modules_forge` package: with tests/forge_stub's `backend` it makes `lohatrain.hosts.kind()` "forge", as
in Forge; `main_entry` is its top bar's checkpoint list and choice. Kept apart from tests/forge_stub so that the tests
which put that folder on sys.path still get the A1111 adapter; only the page harness's Forge host (tests/webui_app.py)
adds this one.

Ports modules_forge/__init__.py of lllyasviel/stable-diffusion-webui-forge at commit dfdcbab685e5.
"""
