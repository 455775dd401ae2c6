"""The same settings on the same tiny model give the same files, byte for byte, as they did when these hashes were
recorded: for every network type on every family, with every random stream of a run drawn (batch order, noise,
timesteps, flips, colour, tag order, the VAE's posterior), the text encoders trained and the timestamps fixed
(SOURCE_DATE_EPOCH). A change of lohatrain that was meant to leave behaviour alone must leave these alone.

Floating-point results differ between torch versions, so the hashes are recorded per torch version (the newest and
the stock WebUI's 2.1.2); on another version this test is skipped. To record them again after a change that is
meant to change the files: LOHATRAIN_PRINT_GOLDEN=1 pytest -q -p no:xdist -s tests/test_golden.py."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from lohatrain import methods
from lohatrain.families import ldm_parts
from lohatrain.trainer import train

from runs import EVERY_STREAM, settings_for

TORCH = ".".join(torch.__version__.split("+")[0].split(".")[:2])
DORA = {"locon", "loha"}  # DoRA on two of the types that take it: its scales are in the files too

# sha256 of the .safetensors file then the Lora card's .json, per torch version, family and type.
GOLDEN = {
    "2.13": {
        "sd1-lora": "4df5c2f2e6d45bc0bebcdf1e3957506b854a289c325d19b375c3a560eb2a687d",
        "sd1-locon": "e0ac0b42b86ccc6e1a609c477b1e6fa6bd5b9a45810db273ec1471a52f2a2de9",
        "sd1-loha": "fcb331f79aa83a836e07dddc61c2e7e8e5715664095ec86c6b58d7156e569b3d",
        "sd1-lokr": "c497f36fb55b072221706661980d0bfcdd554914e614b6849b34b39193c0abaa",
        "sd2-lora": "ec5a536dcfc4dcc98cd954d8801935487cbbddd37bcb112e7c7ebf8105bf589b",
        "sd2-locon": "9355e1f19381269d913a4cddf6ad22522fac2561a890d5616170d1f6e31bfa5a",
        "sd2-loha": "812853a70f319478dd093c888778bdb3b32002ee0daa34917f91d63ca95ecefc",
        "sd2-lokr": "22af1ae137cde8bf27d69d019b81f00d09f966df034a888dff6e8f20935006e4",
        "sdxl-lora": "5d6ea1d1fbc4aa8e8c4bdaec42e51327b0312029a335b7dfbeac2f225f991db6",
        "sdxl-locon": "d0e4b71f3978f32830954e9c9becc94e321b0a475705d9b03a146d35b43f43dd",
        "sdxl-loha": "75000c092c2867412d39ef2fde3a7f7366fc9593904bd687e4cfbbfd992f56a1",
        "sdxl-lokr": "15f8539d8d0aaee9d334e89115607557a008cfe79f7061716433978545e7e027",
    },
    "2.1": {
        "sd1-lora": "9b83a517962cc58c8f35b20cc77f57958a561031a89678a2b1041a0426b38d59",
        "sd1-locon": "8aa91a961cfde604818faa225104b8fddf12ec2af1f3d33b50cf83e1ed912c1a",
        "sd1-loha": "2666bc0a9c0e622ef22c27db2bdb7c7a5413297070093bef961d0760ba36025a",
        "sd1-lokr": "8773afe1d46e920f947137d3daa7b3599ed3a291b0d569c687e4c69ea8a0306c",
        "sd2-lora": "b6ce5438ff42129cdd90e4a92190905a45e8fca2edeb91a2f90d31894c3153fd",
        "sd2-locon": "950f2cf903c4603ca298544137569bcce3672c34a3d75073bf74de93b4dfc87c",
        "sd2-loha": "6737a7f4f63c07bc2439c4e26ff826236000026f3d69a0711ec0e588000802fa",
        "sd2-lokr": "0a1019503f16613d50a31e1e0b7c0110d62049a371677dd7c18f6a0aff5978fb",
        "sdxl-lora": "8904a6a76b18a11ce60ff71fff2ca8a09834788e6163eb02d75a4d772d292458",
        "sdxl-locon": "ae63731775b1ae5e219097861b2d32117400b09062641859381a0ce59954972f",
        "sdxl-loha": "9196d5c1c3dbacba62000daa119fe4cd5598b9cd37eb009878754691f1b9369b",
        "sdxl-lokr": "d0a5b0e12d68d2831b7bb02f85f0e8a921a8edda92e7947c568d648545d5bfa9",
    },
}
CASES = [(family, method) for family in ("sd1", "sd2", "sdxl") for method in methods.TYPES]


def files_digest(folder, name: str) -> str:
    digest = hashlib.sha256()
    for suffix in (".safetensors", ".json"):
        digest.update((folder / f"{name}{suffix}").read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_a_run_gives_the_recorded_files(family, method, family_model, sample_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    kind = methods.TYPES[method]
    settings = settings_for(sample_dataset, tmp_path, steps=2, save_dtype="fp16", training_method=method,
                            dora=method in DORA, lokr_factor=4, conv_dim=2 if kind.convolutions else 0, conv_alpha=1,
                            min_snr_gamma=5.0, zero_terminal_snr=family == "sd2", **EVERY_STREAM)
    result = train(ldm_parts(family_model), settings)
    assert result.status == "done"
    found = files_digest(tmp_path, settings.name)
    if os.environ.get("LOHATRAIN_PRINT_GOLDEN"):
        print(f'GOLDEN {TORCH} "{family}-{method}": "{found}",')
    recorded = GOLDEN.get(TORCH)
    if recorded is None:
        pytest.skip(f"no files recorded for torch {TORCH} (only for {', '.join(GOLDEN)})")
    assert found == recorded[f"{family}-{method}"], f"{family} {method}: the files differ from the recorded ones"
