"""Forge's Lora extension, network.py (commit dfdcbab): a file in the Lora folder. Its alias is the metadata's
`ss_output_name` (so a run's intermediate saves share their final file's alias), else its name. Left out: hashes
from the file, the version detection, the cache of metadata."""
import os

from safetensors import safe_open


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if self.is_safetensors:
            with safe_open(filename, "pt") as f:
                self.metadata = f.metadata() or {}
        self.alias = self.metadata.get('ss_output_name', self.name)
        self.shorthash = self.metadata.get('sshs_model_hash', '')[:12]

    def read_hash(self):
        pass


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.mentioned_name = None
