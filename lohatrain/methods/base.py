"""What a network type is: its adapter (the maths of one adapted layer) and the `NetworkType` that declares
everything else about it (labels, file keys, DoRA and convolution support, learning rate, presets, metadata,
settings rules), which the settings, the network, the file writer, the tab and the REST API read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..targets import BLOCK_WEIGHTS, DEFAULT_TARGETS

if TYPE_CHECKING:
    from ..settings import TrainSettings


class Adapter(nn.Module):
    """One adapted layer's trainable part for a base weight of `shape` (out, in[, kh, kw]).

    Initial values are drawn from torch's global RNG, which the network seeds (lohatrain.rng).
    """

    def __init__(self, shape: tuple[int, ...], dim: int, alpha: float, factor: int = -1):
        super().__init__()
        self.shape = tuple(shape)

    def delta(self) -> torch.Tensor:
        """ΔW in the base weight's shape (the file's scale included), float32 like the parameters."""
        raise NotImplementedError

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """`<suffix>: tensor` as the WebUI and ComfyUI read this type (without the `<key>.` prefix)."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.file_tensors().values())


@dataclass(frozen=True)
class Preset:
    """A network size: rank and alpha for linear layers and (when conv_dim > 0) 3x3 convs; LoKr's factor."""

    label: str
    dim: int
    alpha: float
    conv_dim: int
    conv_alpha: float
    file_mb: float  # fp16 file size (MB) on the family's full-size UNet; checked in tests/test_presets.py
    factor: int = -1


def by_family(sd1: dict[str, Preset], sdxl: dict[str, Preset]) -> dict[str, dict[str, Preset]]:
    """Presets keyed by lohatrain.families' names. SD 1.x and 2.x share theirs (their UNets' adapted layers
    differ in size by under 2%; the sizes are SD1.5's); SDXL's UNet has about 3x SD1.5's attention, so its
    presets have their own ranks."""
    return {"sd1": sd1, "sd2": sd1, "sdxl": sdxl}


def _no_problems(settings: TrainSettings) -> list[str]:
    return []


def _no_args(settings: TrainSettings) -> dict[str, str]:
    return {}


@dataclass(frozen=True, eq=False)
class NetworkType:
    """One network type a user can train, declared once in its own module (lohatrain.methods.<name>)."""

    name: str  # the `training_method` setting, and LyCORIS' `algo` in the file's metadata
    label: str  # the tab's dropdown
    summary: str  # one line for the tab: what it is good for, how large its files are
    adapter: type[Adapter]
    suffixes: tuple[str, ...]  # key suffixes every layer of its files has: how a file is recognised as this type
    file_kind: str  # what a file with these suffixes is called in messages (LoRA's and LoCon's keys are the same)
    dora: bool  # DoRA's weight decomposition can be switched on
    convolutions: bool  # adapts 3x3 convolutions (conv_dim > 0)
    learning_rate: float  # the default on SD 1.x and 2.x; SDXL halves it (its batch of 1 makes each step noisier)
    presets: dict[str, dict[str, Preset]]  # family → preset name → size, smallest first
    max_dim: int = 1024  # the largest `dim` the settings accept
    sized_by_factor: bool = False  # lokr_factor belongs to its presets (another factor makes the preset custom)
    kohya_module: str = ""  # the kohya module of its files without DoRA, when not LyCORIS' `lycoris.kohya`
    network_args: Callable[[TrainSettings], dict[str, str]] = _no_args  # its own `ss_network_args`
    # its own rules on settings whose values have their declared types, one message each
    problems: Callable[[TrainSettings], list[str]] = _no_problems

    def learning_rate_for(self, family: str) -> float:
        return self.learning_rate * (0.5 if family == "sdxl" else 1.0)

    def network_module_and_args(self, settings: TrainSettings) -> tuple[str, dict[str, str]]:
        """What kohya's tools and the WebUI's Lora tab read about the type (`ss_network_module`, `ss_network_args`).
        Without DoRA, on the default targets, a type with its own `kohya_module` (plain LoRA: kohya's `networks.lora`)
        names it; the other types, and every type with DoRA or other targets (which kohya's module lacks), are
        LyCORIS' `lycoris.kohya` with the type's `algo` name and the targets as LyCORIS' `preset`. DoRA adds
        `dora_wd` and `wd_on_output` "False": our `dora_scale` is per input channel (the WebUI's axis), LyCORIS'
        default is per output. kohya's block learning-rate weights are written as given, when set."""
        args = {"conv_dim": str(settings.conv_dim), "conv_alpha": str(settings.conv_alpha)} if settings.conv_dim else {}
        weights = {name: getattr(settings, name).strip() for name in BLOCK_WEIGHTS}
        args.update({name: value for name, value in weights.items() if value})
        if settings.block_lr_zero_threshold:
            args["block_lr_zero_threshold"] = str(settings.block_lr_zero_threshold)
        targets = settings.network_targets
        if settings.dora:
            args.update(dora_wd="True", wd_on_output="False")
        elif self.kohya_module and targets == DEFAULT_TARGETS:
            return self.kohya_module, args
        preset = {"preset": targets} if targets != DEFAULT_TARGETS else {}
        return "lycoris.kohya", {**args, "algo": self.name, **preset, **self.network_args(settings)}
