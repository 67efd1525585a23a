"""Load every AOT package of a compile cache in a fresh Python of its own, the way a start loads it,
and say which ones kill the process: for a start that keeps falling back to torch.compile
(`aot_unfinished_load` in the app's log), or a new environment, before it serves.

    python -m ops.aot_load_check --compile-cache run/compile-cache [--after-imports]

Each load runs with faulthandler on, so a native crash leaves the Python stack of the crash in the
output; `--after-imports` imports diffusers and transformers first, as the app does. Exit status 1
when any load died or failed. Loading runs the package's native code, which is why each gets its
own process here: a crash ends that child, not the check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# the start's own entry point (app.aot.aoti_load), without the crash marker around it
_LOAD = """
import sys, pathlib, torch
{imports}
from app.aot import aoti_load
aoti_load(pathlib.Path(sys.argv[1]), torch.device("cuda" if torch.cuda.is_available() else "cpu"))
print("loaded", flush=True)
"""


def packages(cache: Path) -> list[Path]:
    return sorted((cache / "aot").glob("*/*.pt2"))


def load_in_child(package: Path, after_imports: bool, timeout: float = 300) -> dict:
    imports = "import diffusers, transformers\nfrom diffusers import ZImagePipeline" if after_imports else ""
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _LOAD.format(imports=imports),
                               str(package.resolve())], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"package": str(package), "ok": False, "returncode": None, "error": f"no answer in {timeout:.0f} s"}
    ok = done.returncode == 0 and "loaded" in done.stdout
    row = {"package": str(package), "ok": ok, "returncode": done.returncode}
    if not ok:  # a negative code is the signal that killed it (-11: SIGSEGV, -6: abort)
        row["stderr_tail"] = done.stderr[-3000:]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile-cache", type=Path, default=Path("run/compile-cache"))
    parser.add_argument("--after-imports", action="store_true", help="import diffusers and transformers first")
    args = parser.parse_args(argv)
    found = packages(args.compile_cache)
    if not found:
        print(json.dumps({"error": f"no AOT packages under {args.compile_cache / 'aot'}"}))
        return 1
    rows = [load_in_child(p, args.after_imports) for p in found]
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
