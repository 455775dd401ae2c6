"""File hashes with the host's cache rule: a cached hash counts while the file's mtime is not newer than when
it was hashed. The host keeps the cache in cache.json; here it lives in memory (`cache`).

Ports modules/hashes.py of AUTOMATIC1111/stable-diffusion-webui v1.10.1 (commit 30c19445f94a).
"""
import hashlib
import os

from modules import shared

cache = {"hashes": {}, "hashes-addnet": {}}


def calculate_sha256(filename):
    digest = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def addnet_hash_safetensors(b):
    """sha256 of a safetensors file without its header (kohya's / the host's Lora hash)."""
    digest = hashlib.sha256()
    b.seek(0)
    header_len = int.from_bytes(b.read(8), "little")
    b.seek(8 + header_len)
    for block in iter(lambda: b.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    hashes = cache["hashes-addnet" if use_addnet_hash else "hashes"]
    try:
        mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    entry = hashes.get(title)
    if entry is None or entry.get("sha256") is None or mtime > entry.get("mtime", 0):
        return None
    return entry["sha256"]


def sha256(filename, title, use_addnet_hash=False):
    value = sha256_from_cache(filename, title, use_addnet_hash)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    if use_addnet_hash:
        with open(filename, "rb") as f:
            value = addnet_hash_safetensors(f)
    else:
        value = calculate_sha256(filename)
    cache["hashes-addnet" if use_addnet_hash else "hashes"][title] = {"mtime": os.path.getmtime(filename), "sha256": value}
    return value
