"""Import every LoRA preset kohya_ss ships (its presets/lora/*.json) and print what each gave: options taken, not
taken (listed by group) and quiet. None may fail. Also checks that the test configs in tests/data/kohya use every field
these presets use, so the tests (which cannot read kohya_ss) stay representative.

    .venv/bin/python tools/kohya_presets.py /path/to/kohya_ss          (a checkout)
    .venv/bin/python tools/kohya_presets.py /path/to/kohya_ss.git      (a git directory: its HEAD is read)
    .venv/bin/python tools/kohya_presets.py                            (the snapshot at /work/.mirror, when present)

Exits 1 when a preset fails to import or a field is missing from the test configs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from lohatrain.kohya_config import import_text  # noqa: E402

SNAPSHOT = Path("/work/.mirror/bmaltais+kohya_ss/repo")
PRESETS = "presets/lora"


def presets(source: Path) -> dict[str, str]:
    """Preset file name → its text, from a checkout or from a git directory's HEAD."""
    if (source / PRESETS).is_dir():
        return {p.name: p.read_text(encoding="utf-8-sig") for p in sorted((source / PRESETS).glob("*.json"))}
    names = subprocess.run(["git", "--git-dir", str(source), "ls-tree", "-z", "--name-only", "HEAD", f"{PRESETS}/"],
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return {Path(n).name: subprocess.run(["git", "--git-dir", str(source), "show", f"HEAD:{n}"], capture_output=True,
                                         text=True, check=True).stdout
            for n in sorted(names) if n.endswith(".json")}


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else SNAPSHOT
    if not source.exists():
        print(f"no kohya_ss at {source}: give a checkout or a git directory")
        return 2
    found = presets(source)
    failed, fields, totals = [], set(), Counter()
    for name, text in found.items():
        family = "sdxl" if "sdxl" in name.lower() else "sd1"
        try:
            imported = import_text(text, family=family)
            imported.complete(family)
        except Exception:  # what this tool is for: any failure is reported, the rest still run
            failed.append(name)
            print(f"FAILED {name}\n{traceback.format_exc()}")
            continue
        fields |= set(json.loads(text))
        groups = Counter(n.group.split(" (")[0] for n in imported.not_taken)
        totals.update(taken=len(imported.taken), not_taken=len(imported.not_taken), quiet=len(imported.quiet))
        print(f"{name}: {len(imported.taken)} taken, {len(imported.not_taken)} not taken, {len(imported.quiet)} quiet")
        for group, count in sorted(groups.items()):
            print(f"    {count} {group}: " + ", ".join(n.option for n in imported.not_taken
                                                      if n.group.split(" (")[0] == group))
    tested = set().union(*(json.loads(p.read_text()) for p in (REPO_ROOT / "tests" / "data" / "kohya").glob("*.json")))
    missing = sorted(fields - tested)
    print(f"\n{len(found)} presets, {len(failed)} failed; options taken {totals['taken']}, not taken "
          f"{totals['not_taken']}, quiet {totals['quiet']}")
    print("fields of the presets missing from tests/data/kohya: " + (", ".join(missing) or "none"))
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
