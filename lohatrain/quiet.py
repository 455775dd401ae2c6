"""The libraries' known import-time noise, left out: lines that are not lohatrain's and read like errors to a
newcomer on the command line. `LOHATRAIN_VERBOSE=1` (the command line's --verbose) shows them.

- setuptools' `pkg_resources` deprecation warning, which lightning_fabric's namespace declaration triggers when
  pytorch_lightning is imported, and Lightning's deprecation of the `rank_zero_only` that ldm's ddpm.py decorates
  with (lohatrain.ldm_importable);
- ldm's "No module 'xformers'. Proceeding without it." (lohatrain runs ldm's attention through torch's SDPA);
- what bitsandbytes logs about its build when lycoris-lora imports it for its quantized layers (lohatrain.methods;
  bitsandbytes is there for the adamw8bit optimizer, which says itself when it cannot run): its CPU backend missing
  the optional `kernels` package, or a build without GPU support.
"""
import contextlib
import io
import logging
import os
import sys
import warnings

# (category, message regex) of each known warning, the known printed line, and (logger, message start) of each
# known log record
_KNOWN_WARNINGS = ((UserWarning, r"pkg_resources is deprecated as an API"),
                   (DeprecationWarning, r"`pytorch_lightning\.utilities\.distributed\.rank_zero_only` has been "
                                        r"deprecated"))
_KNOWN_LINES = ("No module 'xformers'. Proceeding without it.",)
_KNOWN_LOGS = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
               ("bitsandbytes.cextension", "The installed version of bitsandbytes was compiled without GPU support"))


@contextlib.contextmanager
def known_noise_left_out():
    """Inside: the known warnings ignored, the known printed lines and log records dropped (every other one
    kept)."""
    if os.environ.get("LOHATRAIN_VERBOSE"):
        yield
        return
    printed = io.StringIO()
    filters = [(logging.getLogger(name), _StartsWith(start)) for name, start in _KNOWN_LOGS]
    with warnings.catch_warnings():
        for category, message in _KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger, dropped in filters:
            logger.addFilter(dropped)
        try:
            with contextlib.redirect_stdout(printed):
                yield
        finally:
            for logger, dropped in filters:
                logger.removeFilter(dropped)
            kept = [line for line in printed.getvalue().splitlines(keepends=True) if line.strip() not in _KNOWN_LINES]
            sys.stdout.write("".join(kept))


class _StartsWith(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)
