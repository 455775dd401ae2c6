"""benchmarks/gpu.py: its --tiny dry run (what CI runs of the GPU benchmark: tiny UNets on the CPU) and its table of
cards' fp16 peaks."""
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu.py"


@functools.lru_cache(maxsize=None)
def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def test_tiny_dry_run_measures_every_cell_of_its_matrix(tmp_path):
    out = tmp_path / "tiny.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # bounds, not timings: every cell must run, however loaded the machine (its estimates take CPU seconds each)
    process = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--json", str(out), "--max-minutes", "60"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert process.returncode == 0, process.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))

    cells = _load_script().tiny_matrix()
    keys = [f.name for f in dataclasses.fields(cells[0])]
    assert [{k: row[k] for k in keys} for row in result["rows"]] == [dataclasses.asdict(c) for c in cells]
    # the dry run takes every path of the full matrix: both model families, both forwards, checkpointing on
    # and off, the deterministic setting, DoRA and every network type
    assert {c.model for c in cells} == {"sd1-tiny", "sdxl-tiny"}
    assert {c.forward for c in cells} == {"merged", "lycoris"}
    assert {c.checkpointing for c in cells} == {True, False}
    assert any(c.deterministic for c in cells) and any(c.dora for c in cells)
    assert {c.method for c in cells} == {"lora", "locon", "loha", "lokr"}

    for row in result["rows"]:
        assert row["status"] == "ok", row
        assert isinstance(row["it_per_s"], float) and row["it_per_s"] > 0
        assert row["step_tflop"] > 0 and row["achieved_tflops"] > 0
        # the CPU has no max_memory_allocated and no known fp16 peak: both are reported as absent
        assert row["peak_vram_gb"] is None and row["peak_share"] is None
        # lohatrain's memory estimate of every cell, beside the measured peak (on a GPU)
        assert isinstance(row["estimate_gb"], float) and row["estimate_gb"] > 0
    assert result["tiny"] is True and result["peak_tflops"] is None
    # the table on stdout has one line per row, each with its network type and speed
    for row in result["rows"]:
        assert any(row["model"] in line and row["network"] in line and f"{row['it_per_s']:.2f}" in line
                   and f"{row['estimate_gb']:.2f}" in line for line in process.stdout.splitlines())


def test_quick_dry_run_runs_every_type_once_on_both_models(tmp_path):
    """`--quick` (every network type once per model, what an unattended first GPU run measures) without a GPU: its
    dry run, the same matrix on the tiny UNets, each cell measured, in the JSON and the table. `--no-estimate`
    leaves out the memory estimates, which the dry run of the tiny matrix above checks (seconds of CPU each)."""
    out = tmp_path / "quick.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-estimate", "--json", str(out),
                              "--max-minutes", "60"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.startswith("no CUDA GPU: nothing to measure on this machine")
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["quick"] is True and result["tiny"] is True

    from lohatrain.methods import TYPES

    # every type the tab offers, DoRA on those that take it
    types = {(m, False) for m in TYPES} | {(m, True) for m, t in TYPES.items() if t.dora}
    rows = result["rows"]
    assert sorted((r["model"], r["method"], r["dora"]) for r in rows) == sorted(
        (model, method, dora) for model in ("sd1-tiny", "sdxl-tiny") for method, dora in types)
    for row in rows:
        assert row["status"] == "ok" and row["checkpointing"] and row["forward"] == "merged", row
        assert row["it_per_s"] > 0 and row["step_tflop"] > 0 and row["estimate_gb"] is None
        assert any(row["model"] in line and row["network"] in line and f"{row['it_per_s']:.2f}" in line
                   for line in process.stdout.splitlines())


def test_peak_table_tells_apart_cards_whose_names_overlap():
    peak = _load_script().lookup_peak
    sxm, pcie, h200 = (peak(n)[0] for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200"))
    assert pcie < sxm == h200
    assert peak("NVIDIA A10")[0] < peak("NVIDIA A100-SXM4-80GB")[0]
    assert peak("NVIDIA L40")[0] < peak("NVIDIA L40S")[0]
    assert peak("NVIDIA L4")[0] < peak("NVIDIA L40")[0]
    # a card the table does not list is unknown (its share shows as n/a), not taken for a near namesake
    assert peak("NVIDIA H100 NVL") is None and peak("NVIDIA GeForce RTX 4090 D") is None
    assert peak("NVIDIA A10G") is None
