"""Every training setting as a command-line option (`learning_rate` → `--learning-rate`), generated from
`TrainSettings` so that none is missing from `--help`, each shown with its default; and the rule by which
options override a settings file."""
from __future__ import annotations

import argparse
import dataclasses
import typing

from .families import BY_NAME
from .settings import SETTING_HELP, TrainSettings

_FAMILY_DEFAULTS = {family: TrainSettings.defaults_for(family) for family in ("sd1", "sd2", "sdxl")}
_METAVARS = {int: "N", float: "X", str: "TEXT"}
# What follows from another setting when that one is given and it is not (as TrainSettings.from_dict fills it).
_FOLLOWS = {"network_preset": ("dim", "alpha", "conv_dim", "conv_alpha", "lokr_factor"),
            "training_method": ("dim", "alpha", "conv_dim", "conv_alpha", "lokr_factor"),
            "resolution": ("bucket_min_side", "bucket_max_side")}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """One option per setting, all defaulting to None (not given): a given one overrides the settings file."""
    group = parser.add_argument_group("settings", "each overrides the --config file's value; the defaults "
                                      "are LoHa's, by model family where they differ")
    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        kind = hints[f.name]
        help_text = f"{SETTING_HELP[f.name]} (default: {_default_text(f.name)})".replace("%", "%%")
        if kind is bool:
            group.add_argument(_option(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            group.add_argument(_option(f.name), nargs="*", metavar="TEXT", default=None, help=help_text)
        else:
            value_type = next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
            group.add_argument(_option(f.name), type=value_type, metavar=_METAVARS[value_type], default=None,
                               help=help_text)


def given_settings(args: argparse.Namespace) -> dict:
    """The settings given as options."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainSettings)
            if getattr(args, f.name) is not None}


def merge(base: dict, given: dict) -> dict:
    """`base` (a settings file, or the demo's settings) with the given options on top. What a given option
    decides (a preset's sizes, the bucket sides around a resolution) is dropped from `base` unless it is given
    too, so that TrainSettings.from_dict derives it again."""
    dropped = {key for setting, follows in _FOLLOWS.items() if setting in given for key in follows} - set(given)
    return {**{k: v for k, v in base.items() if k not in dropped}, **given}


def _default_text(name: str) -> str:
    by_family: dict[str, list[str]] = {}
    for family, settings in _FAMILY_DEFAULTS.items():
        by_family.setdefault(repr(getattr(settings, name)), []).append(BY_NAME[family].label)
    if len(by_family) == 1:
        return _shown(next(iter(by_family)))
    return ", ".join(f"{_shown(value)} on {' and '.join(labels)}" for value, labels in by_family.items())


def _shown(value: str) -> str:
    return {"''": "empty", "[]": "none", "None": "unset"}.get(value, value.strip("'"))
