"""Load an AOT package in a child process first, so that a package whose loading kills the process
is found without killing the app.

Found on the lent H100 (docs/PERFORMANCE.md): its environment names a wrapper of g++ in CXX
(/opt/gcc/bin/g++), which AOTInductor uses for the package's shared library; every package built
through it died with SIGSEGV when loaded, in any process, and the same packages built by the
system g++ loaded. A crash inside the app's start is what supervisord would restart into the same
crash; a crash in a child is a clean answer: the package is refused, and app/runtime/aot/ records the
compiler that built it and builds again with the system g++, or falls back to torch.compile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0  # a fresh interpreter: torch import + the load (a few seconds on the H100)

# the start's own entry point (app.runtime.aot.aoti_load), in a fresh interpreter with faulthandler on
_CHILD_LOAD = """
import sys, pathlib, torch
{imports}
from app.runtime.aot.store import aoti_load
device = torch.device(sys.argv[2])
if device.type == "cuda":  # as the app's start does (loading asks Inductor the CPU's vector ISA)
    from app.runtime.compile import trust_cpu_vector_flags
    trust_cpu_vector_flags()
aoti_load(pathlib.Path(sys.argv[1]), device)
print("loaded", flush=True)
"""


def cpp_compiler() -> str:
    """The C++ compiler AOTInductor builds packages with here (CXX, else its own pick)."""
    try:
        from torch._inductor import cpp_builder

        return str(cpp_builder.get_cpp_compiler())
    except Exception as exc:  # a private API: its absence must not stop a start
        return f"unknown ({exc.__class__.__name__})"


def load_in_child(
    package: Path, device: str = "cpu", after_imports: bool = False, timeout: float = TIMEOUT_S
) -> dict:
    """{"package", "ok", "crashed", "returncode"[, "error", "stderr_tail"]}: a negative returncode is
    the signal that killed the child (-11 SIGSEGV, -6 abort); crashed: killed, or no answer in time
    (an exception is not a crash: it raises in any process, without taking the process down)."""
    imports = "import diffusers, transformers\nfrom diffusers import ZImagePipeline" if after_imports else ""
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-X",
                "faulthandler",
                "-c",
                _CHILD_LOAD.format(imports=imports),
                str(package.resolve()),
                device,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "package": str(package),
            "ok": False,
            "crashed": True,
            "returncode": None,
            "error": f"no answer in {timeout:.0f} s",
        }
    ok = done.returncode == 0 and "loaded" in done.stdout
    row = {"package": str(package), "ok": ok, "crashed": done.returncode < 0, "returncode": done.returncode}
    if not ok:
        row["stderr_tail"] = done.stderr[-3000:]
    return row


def why_failed(row: dict) -> str:
    """One line for a log or an exception."""
    if row.get("error"):
        return row["error"]
    code = row["returncode"]
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    last = [line for line in row.get("stderr_tail", "").splitlines() if line.strip()]
    return f"exit {code}: {last[-1][:200] if last else 'no output'}"
