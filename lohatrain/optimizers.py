"""The optimizers a run can use, each from its maintained package, chosen by name (`TrainSettings.optimizer`):
how it is built from the settings and the free-form `optimizer_args` (kohya's `--optimizer_args` form,
`weight_decay=0.05 betas=0.9,0.99`, checked against the optimizer's own constructor), and what the file's
metadata says about it (kohya's `ss_optimizer`: the class's module and name, then the arguments the user chose).
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
from dataclasses import dataclass

import torch

from . import compat
from .errors import LohatrainError, SettingsError


@dataclass(frozen=True)
class Optimizer:
    label: str  # as the tab and messages name it
    module: str  # where the class is imported from
    attribute: str
    package: str  # the distribution that brings it
    kohya_name: str  # kohya's `optimizer_class.__module__ + "." + optimizer_class.__name__`


OPTIMIZERS = {
    "adamw": Optimizer("AdamW", "torch.optim", "AdamW", "torch", "torch.optim.AdamW"),  # lohatrain's name since 1.0
    "adamw8bit": Optimizer("AdamW 8-bit", "bitsandbytes.optim", "AdamW8bit", "bitsandbytes",
                           "bitsandbytes.optim.adamw.AdamW8bit"),
    "prodigy": Optimizer("Prodigy", "prodigyopt", "Prodigy", "prodigyopt", "prodigyopt.prodigy.Prodigy"),
    "lion": Optimizer("Lion", "lion_pytorch", "Lion", "lion-pytorch", "lion_pytorch.lion_pytorch.Lion"),
    "adafactor": Optimizer("Adafactor", "transformers.optimization", "Adafactor", "transformers",
                           "transformers.optimization.Adafactor"),
}
DEFAULT = "adamw"
PRODIGY_LR = 1.0  # Prodigy estimates the step size itself; the learning rate only scales its estimate
LION_DIVISOR = 3  # Lion's sign updates are larger than AdamW's: its authors advise a 3-10x smaller rate


def suggested_rate(name: str, adamw_rate: float, relative_step: bool = True) -> tuple[float, str]:
    """The learning rate to start from with this optimizer, given the network type's usual AdamW rate, and why in
    plain words (the tab's suggestion)."""
    if name == "prodigy":
        return PRODIGY_LR, "Prodigy's: it finds the step size itself and the rate only scales it"
    if name == "lion":
        return adamw_rate / LION_DIVISOR, (f"a third of the usual AdamW rate {adamw_rate:g}: Lion's steps are larger, "
                                           "so it wants a 3 to 10 times smaller rate")
    if name == "adafactor" and relative_step:
        return adamw_rate, "the usual AdamW rate, though unused: Adafactor sets its own step size (relative step)"
    return adamw_rate, f"the usual rate with {OPTIMIZERS[name].label}"
_SET_BY_LOHATRAIN = {"params": "the network's weights", "lr": "learning_rate (and text_encoder_lr)"}


def parse_args(text: str) -> tuple[dict, list[str]]:
    """`name=value` pairs separated by spaces, each value a Python literal as kohya reads it (`0.05`, `True`,
    `0.9,0.99` for a tuple; `true`/`false`/`none` in any case too). Returns (arguments in order, problems)."""
    args, problems = {}, []
    for token in (text or "").split():
        name, sep, raw = token.partition("=")
        if not sep or not name.isidentifier():
            problems.append(f"optimizer_args: {token!r} must be name=value, e.g. weight_decay=0.05")
            continue
        word = {"true": "True", "false": "False", "none": "None"}.get(raw.lower(), raw)
        try:
            value = ast.literal_eval(word)
        except (ValueError, SyntaxError):
            problems.append(f"optimizer_args: {name}={raw} is not a number, True/False, None or numbers separated "
                            "by commas")
            continue
        if name in args:
            problems.append(f"optimizer_args: {name} is given twice")
        elif name in _SET_BY_LOHATRAIN:
            problems.append(f"optimizer_args: {name} cannot be given here; it is set by {_SET_BY_LOHATRAIN[name]}")
        else:
            args[name] = value
    return args, problems


def _from_settings(settings) -> list[tuple[str, object, str, bool]]:
    """The constructor arguments the optimizer's own settings give: (argument, value, setting, set by the user)."""
    given = []
    if settings.weight_decay is not None:
        given.append(("weight_decay", settings.weight_decay, "weight_decay", True))
    if settings.optimizer == "prodigy":
        for arg, setting, default in (("d_coef", "prodigy_d_coef", 1.0),
                                      ("use_bias_correction", "prodigy_bias_correction", False),
                                      ("safeguard_warmup", "prodigy_safeguard_warmup", False)):
            if getattr(settings, setting) != default:
                given.append((arg, getattr(settings, setting), setting, True))
    if settings.optimizer == "adafactor":
        # kohya's default (relative_step on); a fixed rate also turns off the scaling by the weights' size, so the
        # learning rate is the step size (transformers' advice for an external learning rate)
        fixed = not settings.adafactor_relative_step
        given.append(("relative_step", not fixed, "adafactor_relative_step", fixed))
        if fixed:
            given += [("scale_parameter", False, "adafactor_relative_step", True),
                      ("warmup_init", False, "adafactor_relative_step", True)]
    return given


def chosen_args(settings) -> tuple[dict, list[str]]:
    """The constructor arguments the user chose, as kohya would pass them: the optimizer's settings, then
    `optimizer_args` (which may change what a setting left at its default gives, but not what one was set to)."""
    args, problems = parse_args(settings.optimizer_args)
    merged = {}
    for arg, value, setting, set_by_user in _from_settings(settings):
        if arg in args and set_by_user and args[arg] != value:
            problems.append(f"optimizer_args: {arg}={args[arg]} contradicts {setting} (which gives {arg}={value}): "
                            "set it in one place")
        merged[arg] = value
    merged.update(args)
    return merged, problems


def problems(settings) -> list[str]:
    """What the settings get wrong about the optimizer, without importing its package (the signature check is
    `check`'s, before a run)."""
    args, found = chosen_args(settings)
    if settings.optimizer not in OPTIMIZERS:
        found.insert(0, f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {settings.optimizer!r}")
    if settings.optimizer == "prodigy":
        if isinstance(settings.learning_rate, (int, float)) and settings.learning_rate < 0.1:
            found.append(f"learning_rate must be about 1.0 with prodigy, not {settings.learning_rate}: Prodigy finds "
                         "the step size itself and the learning rate only scales it (tune prodigy_d_coef instead)")
        if settings.text_encoder_lr not in (0, settings.learning_rate):
            found.append("text_encoder_lr must be 0 (off) or the same as learning_rate with prodigy: it adapts one "
                         "step size for the whole network")
    if settings.optimizer == "adafactor" and args.get("relative_step") is True and (
            settings.lr_scheduler != "constant" or settings.lr_warmup_steps):
        found.append("adafactor with a relative step sets its own step size (1/sqrt(step)), so lr_scheduler must be "
                     "constant and lr_warmup_steps 0; or turn adafactor_relative_step off to train with the learning "
                     "rate and its schedule")
    return found


def ss_optimizer(settings) -> str:
    """kohya's `ss_optimizer`: `prodigyopt.prodigy.Prodigy(d_coef=2.0,use_bias_correction=True)`; only the arguments
    the user chose are listed, so the default is exactly `torch.optim.AdamW`."""
    args, _ = chosen_args(settings)
    listed = ",".join(f"{k}={v}" for k, v in args.items())
    return OPTIMIZERS[settings.optimizer].kohya_name + (f"({listed})" if listed else "")


def optimizer_class(name: str):
    """The optimizer's class, imported; a missing or broken package is a clear error."""
    chosen = OPTIMIZERS[name]
    top = chosen.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        how = ("the WebUI installs it when a run chooses adamw8bit; elsewhere run `python install.py bitsandbytes` in "
               "lohatrain's folder with the Python that runs lohatrain (it picks the version for this torch)"
               if chosen.package == "bitsandbytes" else
               "restart the WebUI (lohatrain's installer adds it, or its console says why it cannot); elsewhere run "
               "lohatrain's install.py with the Python that runs lohatrain")
        raise LohatrainError(f"the optimizer {name} needs the Python package {chosen.package}, which is not "
                             f"installed: {how}")
    try:
        return getattr(importlib.import_module(chosen.module), chosen.attribute)
    except Exception as e:  # a package built for another torch fails in its own ways
        raise LohatrainError(f"the optimizer {name} needs {chosen.package}, and the installed "
                             f"{chosen.package} {_version(chosen.package)} cannot be loaded beside torch "
                             f"{torch.__version__}: {_one_line(e)}") from None


def check(settings) -> None:
    """Before a run: the package is there, and the arguments are ones its constructor takes, of the type it takes
    and accepted by it (a SettingsError listing each problem)."""

    cls = optimizer_class(settings.optimizer)
    args, found = chosen_args(settings)
    parameters = inspect.signature(cls.__init__).parameters
    takes = [n for n, p in parameters.items() if n not in ("self", *_SET_BY_LOHATRAIN)
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name, value in args.items():
        if name not in takes:
            close = difflib.get_close_matches(name, takes, n=1)
            found.append(f"optimizer_args: {settings.optimizer} has no argument {name!r}"
                         + (f" (did you mean {close[0]}?)" if close else "") + f"; it takes {', '.join(takes)}")
            continue
        wrong = _type_problem(value, parameters[name].default)
        if wrong:
            found.append(f"optimizer_args: {name} must be {wrong}, not {value!r}")
    if not found:  # the constructor's own checks (ranges, combinations), on a stand-in weight
        try:
            build(settings, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": settings.learning_rate}],
                  torch.device("cpu"))
        except Exception as e:
            found.append(f"optimizer_args: {settings.optimizer} does not take these arguments ({_one_line(e)})")
    if found:
        raise SettingsError(found)


def _type_problem(value, default) -> str | None:
    """What `value` should be, judged by the constructor's default, or None when it fits."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if number(default):
        return None if number(value) else "a number"
    if isinstance(default, (tuple, list)):
        fits = isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(number, value))
        return None if fits else f"{len(default)} numbers separated by commas"
    if default is None:
        return None if value is None or number(value) else "a number or None"
    return None


def build(settings, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """The run's optimizer over its parameter groups (each with its learning rate)."""
    cls = optimizer_class(settings.optimizer)
    args, _ = chosen_args(settings)
    if settings.optimizer == "adamw":
        # The fused kernel updates all trainable tensors at once: the per-tensor loop was ~8% of a step.
        args = {"fused": compat.fused_adamw_supported(device.type), **args}
    return cls(groups, **args)


def current_lr(optimizer: torch.optim.Optimizer, scheduled: float) -> float:
    """The step size the optimizer takes now, for the progress display: Prodigy's adapted d × learning rate,
    Adafactor's relative step, else the scheduled rate."""
    group = optimizer.param_groups[0]
    if "d" in group:
        return group["d"] * scheduled
    if group.get("relative_step"):
        state = next((optimizer.state[p] for p in group["params"] if optimizer.state.get(p)), None)
        if state:
            return type(optimizer)._get_lr(group, state)
    return scheduled


def run_metadata(optimizer: torch.optim.Optimizer) -> dict[str, str]:
    """What the optimizer learnt that a file should say: Prodigy's adapted step size d."""
    group = optimizer.param_groups[0]
    return {"lohatrain_prodigy_d": repr(float(group["d"]))} if "d" in group else {}


@functools.lru_cache(maxsize=None)
def _runs_8bit(device: str) -> str | None:
    """Why bitsandbytes cannot take an 8-bit AdamW step on this device, or None: one step on a tensor big
    enough for its 8-bit state (a build without this device's kernels fails only there)."""
    cls = optimizer_class("adamw8bit")
    try:
        weight = torch.nn.Parameter(torch.ones(4096, device=device))  # a device this torch lacks fails here
        weight.grad = torch.ones_like(weight)
        cls([weight]).step()
    except Exception as e:
        return _one_line(e)
    return None


def why_no_8bit(device) -> str | None:
    """Why AdamW 8-bit cannot run on `device` here (bitsandbytes missing, unloadable, or without kernels for the
    device), or None when it can."""
    try:
        optimizer_class("adamw8bit")
    except LohatrainError as e:
        return str(e)
    reason = _runs_8bit(str(device))
    return reason and (f"bitsandbytes {_version('bitsandbytes')} has no 8-bit optimizer for this "
                       f"{torch.device(device).type.upper()} ({reason})")


def check_device(settings, device: torch.device) -> None:
    """An optimizer that cannot run on the training device (bitsandbytes without a build for it) is refused."""
    if settings.optimizer != "adamw8bit":
        return
    reason = _runs_8bit(str(device))
    if reason:
        raise LohatrainError(f"{OPTIMIZERS['adamw8bit'].label} cannot run on this {device.type.upper()}: bitsandbytes "
                             f"{_version('bitsandbytes')} has no 8-bit optimizer for it ({reason}). Choose adamw "
                             "(the same maths with full-size state) or another optimizer.")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
