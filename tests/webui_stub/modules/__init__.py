"""A small, faithful stand-in for the AUTOMATIC1111 WebUI (v1.10.1) `modules` package; see ../README.md.

Ports modules/ of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
