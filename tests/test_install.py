"""install.py, run the way the WebUI runs it: a separate Python process with PYTHONPATH = WebUI root.

Each test uses a throwaway venv in tmp_path standing for the WebUI's Python, and a fake WebUI root
whose `launch.py` has the host's (v1.10.1) `is_installed` / `run_pip` / `run` behaviour and also
records every `run_pip` call to a file; a root without `launch.py` exercises install.py's fallback.

Fast tests use venvs made `--without-pip`, with fake `*.dist-info` folders standing for installed
packages (no network; pip, if called, fails for real). The `slow` tests make a venv with pip and
the host's pins and really install lycoris-lora from the package registry (about 10 s each with a
warm pip cache); set LOHATRAIN_FAST_TESTS=1 to skip them.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

INSTALL_PY = Path(__file__).resolve().parent.parent / "install.py"

slow = pytest.mark.skipif(os.environ.get("LOHATRAIN_FAST_TESTS") == "1",
                          reason="LOHATRAIN_FAST_TESTS=1: skips the tests that install from the registry")

# Light stand-ins for packages the WebUI pins (v1.10.1 requirements_versions.txt: einops 0.4.1,
# safetensors 0.4.2, Pillow 9.5.0, numpy 1.26.x). torch is left out: a huge wheel, and install.py
# installs lycoris-lora --no-deps, so installation never needs it.
HOST_PINS = {"numpy": "1.26.4", "einops": "0.4.1", "safetensors": "0.4.2", "tqdm": "4.66.1",
             "pillow": "9.5.0"}

# The parts of the WebUI v1.10.1 `launch` module (modules/launch_utils.py) that install.py may use,
# plus a log of run_pip calls (JSON lines in $FAKE_LAUNCH_LOG).
FAKE_LAUNCH = '''
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"


class args:
    skip_install = False


def run(command, desc=None, errdesc=None, custom_env=None, live=default_command_live):
    if desc is not None:
        print(desc)
    kwargs = dict(args=command, shell=True, env=os.environ if custom_env is None else custom_env,
                  encoding="utf8", errors="ignore")
    if not live:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    result = subprocess.run(**kwargs)
    if result.returncode != 0:
        bits = [f"{errdesc or 'Error running command'}.", f"Command: {command}",
                f"Error code: {result.returncode}"]
        if result.stdout:
            bits.append(f"stdout: {result.stdout}")
        if result.stderr:
            bits.append(f"stderr: {result.stderr}")
        raise RuntimeError("\\n".join(bits))
    return result.stdout or ""


def is_installed(package):
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run_pip(command, desc=None, live=default_command_live):
    with open(os.environ["FAKE_LAUNCH_LOG"], "a") as log:
        log.write(json.dumps({"command": command, "desc": desc}) + "\\n")
    if args.skip_install:
        return
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    return run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}',
               desc=f"Installing {desc}", errdesc=f"Couldn't install {desc}", live=live)
'''


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def make_venv(path, with_pip):
    command = [sys.executable, "-m", "venv", str(path)] + ([] if with_pip else ["--without-pip"])
    subprocess.run(command, check=True, capture_output=True)
    return path / "bin" / "python"


def site_packages(python):
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())


def fake_installed(python, **versions):
    """Makes `name==version` look installed to importlib.metadata (a bare .dist-info folder)."""
    for name, version in versions.items():
        info = site_packages(python) / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def installed(python):
    """{canonical name: version} of everything installed in the venv."""
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    out = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout
    return {canonical(name): version for name, version in json.loads(out).items()}


def webui_root(tmp_path, with_launch):
    root = tmp_path / ("webui" if with_launch else "webui-without-launch")
    root.mkdir()
    if with_launch:
        (root / "launch.py").write_text(FAKE_LAUNCH)
    return root


def run_install(python, root, *args):
    """Runs install.py as the WebUI does (lohatrain too, with `bitsandbytes`); returns (process, run_pip calls
    recorded by the fake launch)."""
    log = root / "run_pip.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(root), FAKE_LAUNCH_LOG=str(log))
    log.write_text("")
    process = subprocess.run([str(python), str(INSTALL_PY), *args], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return process, calls


ALL_PRESENT = dict(torch="2.13.0", lycoris_lora="4.1.3", einops="0.4.1", safetensors="0.4.2", toml="0.10.2",
                   tqdm="4.66.1", Pillow="9.5.0", ImageHash="4.3.1", prodigyopt="1.1.2", lion_pytorch="0.2.5")
STOCK_TORCH = "2.1.2+cu121"  # what a stock WebUI v1.10.1 installs (modules/launch_utils.py)


def test_all_present_does_nothing(tmp_path):
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **ALL_PRESENT)
    start = time.perf_counter()
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    print(f"install.py with everything present: {time.perf_counter() - start:.3f} s")
    assert process.returncode == 0
    assert (process.stdout, process.stderr, calls) == ("", "", [])


@pytest.mark.parametrize("torch_version,lycoris", [(STOCK_TORCH, "3.4.0"), ("2.3.1", "3.4.0"),
                                                   ("2.4.0", "4.1.3"), ("2.7.1+cu128", "4.1.3")])
def test_picks_the_newest_lycoris_that_imports_with_the_torch_found(tmp_path, torch_version, lycoris):
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{k: v for k, v in ALL_PRESENT.items() if k not in ("lycoris_lora", "torch")},
                   torch=torch_version)
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    assert process.returncode == 0
    assert [call["command"] for call in calls] == [f"install --no-deps lycoris-lora=={lycoris}"]


@pytest.mark.parametrize("torch_version,found", [(STOCK_TORCH, "3.2.0"), ("2.13.0", "3.4.0"),
                                                 ("2.13.0", "4.1.0")])
def test_a_lycoris_that_works_with_this_torch_is_left_alone(tmp_path, torch_version, found):
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{**ALL_PRESENT, "torch": torch_version, "lycoris_lora": found})
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    assert (process.returncode, process.stdout, process.stderr, calls) == (0, "", "", [])


@pytest.mark.parametrize("torch_version,found,wanted", [(STOCK_TORCH, "4.1.3", "3.4.0"),
                                                        ("2.13.0", "2.2.0", "4.1.3")])
def test_a_lycoris_that_cannot_work_is_replaced_with_one_line(tmp_path, torch_version, found, wanted):
    """4.x fails at import on torch < 2.4 (torch.library.custom_op); 2.x lacks the module API lohatrain uses."""
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{**ALL_PRESENT, "torch": torch_version, "lycoris_lora": found})
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    assert process.returncode == 0 and process.stderr == ""
    assert [call["command"] for call in calls] == [f"install --no-deps lycoris-lora=={wanted}"]
    assert process.stdout.splitlines()[0] == (
        f"[lohatrain] lycoris-lora {found} does not work with torch {torch_version}: installing "
        f"lycoris-lora {wanted}, which does")


def test_a_torch_too_old_is_one_line_and_installs_nothing(tmp_path):
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{**ALL_PRESENT, "torch": "1.13.1+cu117"})
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    assert process.returncode == 0 and process.stderr == "" and calls == []
    assert process.stdout.splitlines() == [
        "[lohatrain] torch 1.13.1+cu117 is older than lohatrain supports (2.1): update the WebUI (v1.10 installs "
        "torch 2.1.2); the LoRA training tab will say the same"]


def test_pip_failure_prints_one_line_and_exits_0(tmp_path):
    """Only the missing packages are asked for; pip failing (no pip in this venv) is one line."""
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, torch="2.13.0", lycoris_lora="4.1.3", einops="0.4.1", Pillow="9.5.0")
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True))
    assert process.returncode == 0
    assert [call["command"] for call in calls] == [
        "install --no-deps safetensors toml tqdm ImageHash prodigyopt==1.1.2 lion-pytorch==0.2.5"]
    ours = [line for line in process.stdout.splitlines() if line.startswith("[lohatrain]")]
    assert len(ours) == 1
    assert ours[0].startswith("[lohatrain] could not install safetensors, toml, tqdm, ImageHash, prodigyopt==1.1.2, "
                              "lion-pytorch==0.2.5 (")
    assert "No module named pip" in ours[0]
    assert ours[0].endswith("the LoRA training tab will be unavailable until it is installed")
    # Besides our line, only the host's own announcement from run_pip.
    assert [line for line in process.stdout.splitlines() if line not in ours] == [
        "Installing lohatrain requirements: safetensors, toml, tqdm, ImageHash, prodigyopt==1.1.2, "
        "lion-pytorch==0.2.5"]
    assert process.stderr == ""


def test_pip_failure_outside_webui_prints_one_line_and_exits_0(tmp_path):
    python = make_venv(tmp_path / "venv", with_pip=False)
    process, calls = run_install(python, webui_root(tmp_path, with_launch=False))
    assert process.returncode == 0 and process.stderr == ""
    lines = process.stdout.splitlines()
    everything = ("lycoris-lora==4.1.3, einops, safetensors, toml, tqdm, Pillow, ImageHash, prodigyopt==1.1.2, "
                  "lion-pytorch==0.2.5")
    assert lines[0] == f"Installing lohatrain requirements: {everything}"
    assert len(lines) == 2 and lines[1].startswith(f"[lohatrain] could not install {everything} (")


@pytest.mark.parametrize("torch_version,wanted", [(STOCK_TORCH, "0.45.5"), ("2.3.1", "0.49.2"),
                                                  ("2.4.0", "0.50.2"), ("2.13.0", "0.50.2")])
def test_bitsandbytes_is_installed_only_when_asked_for_this_torch_with_one_line(tmp_path, torch_version, wanted):
    """Each the newest release whose torch requirement this torch meets; the WebUI's start never installs it."""
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{**ALL_PRESENT, "torch": torch_version, "lycoris_lora": "3.4.0"})
    root = webui_root(tmp_path, with_launch=True)
    assert run_install(python, root)[1] == []  # the start: not asked for
    process, calls = run_install(python, root, "bitsandbytes")
    assert [call["command"] for call in calls] == [f"install --no-deps bitsandbytes=={wanted}"]
    assert process.stdout.splitlines()[0] == f"Installing bitsandbytes {wanted} for AdamW 8-bit (a large download, once)"
    # this venv has no pip: the failure is one line, and the exit status tells lohatrain to refuse the run
    assert process.returncode == 1 and len(process.stdout.splitlines()) == 2
    reason = process.stdout.splitlines()[1]
    assert reason.startswith(f"[lohatrain] could not install bitsandbytes {wanted} for AdamW 8-bit (")
    assert "No module named pip" in reason and reason.endswith("): choose another optimizer")


def test_bitsandbytes_already_there_or_a_torch_too_old_installs_nothing(tmp_path):
    python = make_venv(tmp_path / "venv", with_pip=False)
    fake_installed(python, **{**ALL_PRESENT, "bitsandbytes": "0.43.3"})
    process, calls = run_install(python, webui_root(tmp_path, with_launch=True), "bitsandbytes")
    assert (process.returncode, process.stdout, process.stderr, calls) == (0, "", "", [])

    (tmp_path / "old").mkdir()
    old = make_venv(tmp_path / "old" / "venv", with_pip=False)
    fake_installed(old, **{**ALL_PRESENT, "torch": "1.13.1+cu117"})
    process, calls = run_install(old, webui_root(tmp_path / "old", with_launch=True), "bitsandbytes")
    assert (process.returncode, calls) == (1, [])
    assert process.stdout.splitlines() == [
        "[lohatrain] AdamW 8-bit needs bitsandbytes, which needs torch 2.0 or later, and this WebUI has torch "
        "1.13.1+cu117: choose another optimizer, or update the WebUI"]


@pytest.fixture
def host_venv(tmp_path):
    """A venv with pip and the host's pins; skips the test when the registry cannot be reached."""
    python = make_venv(tmp_path / "venv", with_pip=True)
    pins = [f"{name}=={version}" for name, version in HOST_PINS.items()]
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.skip("could not install the host's pins: " + result.stderr.strip().splitlines()[-1])
    return python


@slow
@pytest.mark.parametrize("inside_webui", [False, True], ids=["fallback-pip", "launch.run_pip"])
def test_installs_lycoris_without_touching_pins_then_does_nothing(tmp_path, host_venv, inside_webui):
    before = installed(host_venv)
    assert {name: before[name] for name in HOST_PINS} == HOST_PINS

    start = time.perf_counter()
    process, calls = run_install(host_venv, webui_root(tmp_path, with_launch=inside_webui))
    print(f"first run (installs): {time.perf_counter() - start:.2f} s")
    assert process.returncode == 0, process.stdout + process.stderr
    assert "[lohatrain]" not in process.stdout, process.stdout
    after = installed(host_venv)
    assert after["lycoris-lora"] == "4.1.3"
    assert {name: after.get(name) for name in before} == before  # nothing upgraded or downgraded
    # only additions: no torch
    assert set(after) - set(before) == {"lycoris-lora", "toml", "imagehash", "prodigyopt", "lion-pytorch"}
    assert (after["prodigyopt"], after["lion-pytorch"]) == ("1.1.2", "0.2.5")
    if inside_webui:
        assert [call["command"] for call in calls] == [
            "install --no-deps lycoris-lora==4.1.3 toml ImageHash prodigyopt==1.1.2 lion-pytorch==0.2.5"]

    # The second start: everything is present, so no pip call and no output at all.
    root = tmp_path / "second-start"
    root.mkdir()
    (root / "launch.py").write_text(FAKE_LAUNCH)
    start = time.perf_counter()
    process, calls = run_install(host_venv, root)
    print(f"second run (nothing to do): {time.perf_counter() - start:.3f} s")
    assert process.returncode == 0
    assert (process.stdout, process.stderr, calls) == ("", "", [])
    assert installed(host_venv) == after
