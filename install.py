"""Installs what lohatrain needs on top of the WebUI; the WebUI runs this file at every start.

The WebUI runs it with its own Python (PYTHONPATH = WebUI root, so `import launch` works) and
prints whatever it prints. So it must:
  * cost next to nothing when everything is present: only metadata look-ups, no pip, no heavy
    imports (not even `launch`, whose import parses the WebUI's command line);
  * never change a package the WebUI pinned (torch, numpy, transformers, gradio, ...): every
    install is `--no-deps` and names only packages that are missing, so pip cannot upgrade or
    downgrade anything that is already there;
  * never stop the WebUI from starting: any failure becomes one `[lohatrain] ...` line.

`install.py bitsandbytes` installs AdamW 8-bit's package, which only a run that chooses it needs (see
install_bitsandbytes); lohatrain runs it that way, as the WebUI runs this file.
"""

import importlib.metadata
import subprocess
import sys

LYCORIS = "lycoris-lora"
# The newest lycoris-lora that imports with the torch found, each tested with lohatrain: 4.x calls
# torch's custom-op registration API at import (new in torch 2.4); 3.4.0 imports on the stock WebUI's torch 2.1.2.
LYCORIS_FOR_TORCH = [((2, 4), "4.1.3"), ((2, 1), "3.4.0")]
MIN_LYCORIS = (3, 2)  # lycoris.functional as lohatrain uses it (diff_weight per type, factorization, DoRA)

# lycoris-lora 3.4 and 4.1 require einops, numpy, safetensors, toml, torch and tqdm; lohatrain itself
# also uses Pillow. torch and numpy are left out on purpose: the WebUI installs them (pinned)
# before it runs extension installers, and only the WebUI should choose their versions.
# None of these has a required dependency of its own, hence `--no-deps` is safe
# (tqdm's colorama is Windows-only and optional). ImageHash (the dataset doctor's perceptual hash) needs
# numpy, scipy, PyWavelets and Pillow, which the WebUI has (scikit-image brings scipy and PyWavelets); without
# them the doctor skips near duplicates and says so.
LIGHT_DEPENDENCIES = ["einops", "safetensors", "toml", "tqdm", "Pillow", "ImageHash"]
# The optimizers Prodigy and Lion (lohatrain/optimizers.py): pure Python, a few kB each, at the versions tested with
# lohatrain on torch 2.1.2 and the newest; prodigyopt requires nothing, lion-pytorch only torch.
OPTIMIZER_PACKAGES = {"prodigyopt": "1.1.2", "lion-pytorch": "0.2.5"}

# AdamW 8-bit's bitsandbytes is a large binary (45 to 75 MB of GPU libraries), so it is installed only when a run
# asks for it (`install.py bitsandbytes`, from lohatrain/webui/actions.py): for each torch, the newest release
# whose torch requirement it meets (0.50 requires torch 2.4, 0.49 torch 2.3, 0.45 torch 2.0). It also needs numpy
# and packaging, which every WebUI has.
BITSANDBYTES = "bitsandbytes"
BITSANDBYTES_FOR_TORCH = [((2, 4), "0.50.2"), ((2, 3), "0.49.2"), ((2, 0), "0.45.5")]


def installed_version(name):
    """The installed distribution's version, or None. A metadata look-up: no import, no pip."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(version):
    """(2, 1) from "2.1.2+cu121": major and minor only."""
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in parts)


def for_torch(table, torch_version):
    """The version a table of (oldest torch, version) gives for this torch ("2.1.2+cu121"), or None if torch is
    too old."""
    found = version_tuple(torch_version) if torch_version else (99, 0)
    return next((version for minimum, version in table if found >= minimum), None)


def lycoris_for(torch_version):
    """The lycoris-lora version to install beside this torch, or None if torch is too old."""
    return for_torch(LYCORIS_FOR_TORCH, torch_version)


def lycoris_works(lycoris_version, torch_version):
    """Whether an installed lycoris-lora can be imported and used by lohatrain beside this torch."""
    found = version_tuple(lycoris_version)
    return found >= MIN_LYCORIS and (found < (4, 0) or lycoris_for(torch_version) == LYCORIS_FOR_TORCH[0][1])


def missing_requirements():
    """Requirement strings to install, e.g. ["lycoris-lora==3.4.0", "toml"]; [] when all is there.

    A lycoris-lora that works with the torch found is left alone (the user, or another extension, chose
    it). One that cannot (4.x beside torch < 2.4 fails at import; 2.x lacks the API) is replaced by the one
    that can, with one line saying so. torch is never installed or changed: the WebUI chooses it.
    """
    torch_version = installed_version("torch")
    wanted = lycoris_for(torch_version)
    if wanted is None:
        print(f"[lohatrain] torch {torch_version} is older than lohatrain supports (2.1): update the WebUI "
              "(v1.10 installs torch 2.1.2); the LoRA training tab will say the same", flush=True)
        return []
    missing = []
    lycoris = installed_version(LYCORIS)
    if lycoris is None:
        missing.append(f"{LYCORIS}=={wanted}")
    elif not lycoris_works(lycoris, torch_version):
        print(f"[lohatrain] {LYCORIS} {lycoris} does not work with torch {torch_version}: installing "
              f"{LYCORIS} {wanted}, which does", flush=True)
        missing.append(f"{LYCORIS}=={wanted}")
    missing += [name for name in LIGHT_DEPENDENCIES if installed_version(name) is None]
    missing += [f"{name}=={version}" for name, version in OPTIMIZER_PACKAGES.items() if installed_version(name) is None]
    return missing


def pip_install(requirements, desc=None):
    """`pip install --no-deps <requirements>`, through the WebUI's `launch.run_pip` when there is one, which
    prints one line: "Installing <desc>".

    `launch.run_pip` honours the WebUI's --skip-install and INDEX_URL, and raises RuntimeError on
    failure. Outside the WebUI (tests, a manual run) pip is run directly, the same way.
    """
    args = "install --no-deps " + " ".join(requirements)
    desc = desc or "lohatrain requirements: " + ", ".join(requirements)
    try:
        import launch
        run_pip = launch.run_pip
    except (Exception, SystemExit):  # not inside the WebUI
        run_pip = None
    if run_pip is not None:
        run_pip(args, desc)
        return
    print(f"Installing {desc}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", *args.split(), "--prefer-binary"],
                            capture_output=True, text=True, errors="replace")
    if result.returncode != 0:
        raise RuntimeError(f"pip exited with code {result.returncode}\n{result.stdout}\n{result.stderr}")


def one_line_reason(error):
    """The most telling line of an error: pip's last `ERROR:` line if any, else the last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or [type(error).__name__])[-1]
    return reason if len(reason) <= 300 else reason[:297] + "..."


def install_bitsandbytes():
    """`install.py bitsandbytes`: AdamW 8-bit's package for this torch, when it is missing; one line says so.
    Returns the exit status: 1, after one `[lohatrain]` line saying why, when it cannot be installed."""
    if installed_version(BITSANDBYTES) is not None:
        return 0
    torch_version = installed_version("torch")
    wanted = for_torch(BITSANDBYTES_FOR_TORCH, torch_version)
    if wanted is None:
        print(f"[lohatrain] AdamW 8-bit needs bitsandbytes, which needs torch 2.0 or later, and this WebUI has torch "
              f"{torch_version}: choose another optimizer, or update the WebUI", flush=True)
        return 1
    try:
        pip_install([f"{BITSANDBYTES}=={wanted}"], f"bitsandbytes {wanted} for AdamW 8-bit (a large download, once)")
    except Exception as error:
        print(f"[lohatrain] could not install bitsandbytes {wanted} for AdamW 8-bit ({one_line_reason(error)}): "
              "choose another optimizer", flush=True)
        return 1
    return 0


def main():
    if sys.argv[1:] == [BITSANDBYTES]:
        sys.exit(install_bitsandbytes())
    requirements = []
    try:
        requirements = missing_requirements()
        if requirements:
            pip_install(requirements)
    except Exception as error:  # never stop the WebUI from starting
        what = ", ".join(requirements) or "its requirements"
        print(f"[lohatrain] could not install {what} ({one_line_reason(error)}): "
              f"the LoRA training tab will be unavailable until it is installed", flush=True)


if __name__ == "__main__":
    main()
