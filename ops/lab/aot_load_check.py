"""Load every AOT package of a compile cache in a fresh Python of its own, the way a start loads it,
and say which ones kill the process: for a start that keeps falling back to torch.compile
(`aot_unfinished_load` in the app's log), or a new environment, before it serves.

    python -m ops.lab.aot_load_check --compile-cache run/compile-cache [--after-imports]

Each load runs with faulthandler on, so a native crash leaves the Python stack of the crash in the
output; `--after-imports` imports diffusers and transformers first, as the app does. Exit status 1
when any load died or failed. Loading runs the package's native code, which is why each gets its
own process here: a crash ends that child, not the check. A start does the same for each package it
has just compiled (app/runtime/aot/verify.py), so this is for a cache made elsewhere or before that check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from app.runtime.aot.verify import load_in_child


def packages(cache: Path) -> list[Path]:
    return sorted((cache / "aot").glob("*/*.pt2"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compile-cache", type=Path, default=Path("run/compile-cache"))
    parser.add_argument(
        "--after-imports", action="store_true", help="import diffusers and transformers first"
    )
    args = parser.parse_args(argv)
    found = packages(args.compile_cache)
    if not found:
        print(json.dumps({"error": f"no AOT packages under {args.compile_cache / 'aot'}"}))
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = [load_in_child(p, device, args.after_imports) for p in found]
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
