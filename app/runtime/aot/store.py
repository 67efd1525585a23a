"""The package store under compile_cache_dir/aot/<key>/: build a package (AOTInductor), check it
in a child process before trusting it, keep the compilers' verdicts beside it, and load it with a
crash marker around the load."""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from app.runtime.aot.verify import cpp_compiler, load_in_child, why_failed

log = logging.getLogger(__name__)


def _compile_package(exported, path: Path) -> None:
    """AOTInductor into path, atomically: a crash mid-way leaves no half package for the next start."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.pt2")  # (the packager wants .pt2)
    # Kernels inside the shared library: one file to map at load instead of one per kernel.
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp), inductor_configs={"aot_inductor.embed_kernel_binary": True}
    )
    os.replace(tmp, path)


class PreviousLoadCrashed(RuntimeError):
    """Starts kept dying while loading these packages (a native crash leaves no exception behind)."""


CRASHED_LOADS_LIMIT = 3  # unfinished loads in a row before the packages are refused


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_package(path: Path, device: torch.device):
    """Load with a marker around it: loading runs native code, and a crash there (seen on the H100
    while probing how to load) kills the process without an exception; supervisord would restart it
    into the same crash. The marker lists the processes whose load has not finished. One of them
    may have been killed for another reason (SIGKILL during start-up), so only CRASHED_LOADS_LIMIT
    of them, none still running, make a start refuse the packages; the caller then falls back to
    torch.compile. A finished load clears the marker; a normal exit mid-load, its own entry."""
    marker = path.with_name(path.name + ".loading")
    try:
        pids = [int(p) for p in marker.read_text().split()]
    except (OSError, ValueError):
        pids = []
    gone = [p for p in pids if p != os.getpid() and not _pid_alive(p)]
    if gone:
        log.warning(
            "an earlier load of this package did not finish",
            extra={"event": "aot_unfinished_load", "package": path.name, "pids": gone},
        )
    if len(gone) >= CRASHED_LOADS_LIMIT:
        raise PreviousLoadCrashed(
            f"{len(gone)} starts died while loading {path.name}; remove {marker} to retry"
        )
    try:
        marker.write_text(" ".join(str(p) for p in pids + [os.getpid()]))
    except OSError:  # a read-only cache: load without the guard rather than not at all
        pass
    # A process that exits normally mid-load (stopped by SIGTERM during start-up: the main thread
    # exits while the engine thread loads) did not crash: it takes its entry back on the way out.
    forget = functools.partial(_forget_pid, marker, os.getpid())
    atexit.register(forget)
    try:
        return aoti_load(path, device)
    finally:  # reached unless the process died: a finished load is no evidence of a crash
        atexit.unregister(forget)
        _clear_marker(marker)


def aoti_load(path: Path, device: torch.device):
    """The package, run without AOTInductor's thread-safety protocol. That protocol hands each call
    a model instance and, with the default one instance per package, first waits on an event for
    the previous call's GPU work to finish: the CPU could never queue block N+1 while the GPU ran
    block N, and the GPU sat idle during every block's launch (306 block calls per image); without
    it an image is several percent faster (docs/PERFORMANCE.md, "AOT packages"). The engine
    loads the pipeline and makes every generation on its one thread, so no two calls of a package
    overlap; the installed forwards send a call from any other thread to the eager forward."""
    try:
        return torch._inductor.aoti_load_package(
            str(path), run_single_threaded=True, device_index=device_index(device)
        )
    except TypeError:  # a torch without the switch (< 2.7): correct, only slower
        return torch._inductor.aoti_load_package(str(path), device_index=device_index(device))


def _forget_pid(marker: Path, pid: int) -> None:
    try:
        pids = [p for p in marker.read_text().split() if p != str(pid)]
        if pids:
            marker.write_text(" ".join(pids))
        else:
            marker.unlink()
    except OSError:
        pass


def _clear_marker(marker: Path) -> None:
    try:
        marker.unlink(missing_ok=True)
    except OSError:
        pass


@dataclass
class AotReport:
    """What installing the packages did, for the start-up log and the bench."""

    compiled: list[str] = field(default_factory=list)  # kinds compiled in this start (an empty cache)
    loaded: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    load_s: float = 0.0
    blocks: int = 0
    directory: str = ""


class BrokenPackage(RuntimeError):
    """Every compiler tried built a package that killed the process loading it (checked in a child)."""


FALLBACK_CXX = "g++"  # Inductor's own pick when CXX is unset


# Compiler → why it was refused, for any package built in this process. On the H100 the wrapper in
# CXX crashed the loader of every package it built; asking it again for each of the five packages
# of a first start cost ~40 s apiece (a build and a child check). Kept per process, not on disk: a
# later start reads each package's own record, and a cleared cache tries CXX's compiler once again.
_REFUSED_IN_THIS_PROCESS: dict[str, str] = {}


def _verdict_path(path: Path) -> Path:
    return path.with_name(path.name + ".broken")


def _read_verdicts(path: Path) -> dict[str, str]:
    """Compiler → why its package was refused."""
    try:
        broken = json.loads(path.read_text()).get("broken", {})
        return {str(k): str(v) for k, v in broken.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_verdicts(path: Path, broken: dict[str, str]) -> None:
    try:
        path.write_text(json.dumps({"broken": broken}))
    except OSError:  # a read-only cache: the refusal holds for this start only
        pass


def _compiler_candidates() -> list[str]:
    """The compiler Inductor would use (CXX's, where set), then the system g++ if that is another."""
    first = cpp_compiler()
    fallback = shutil.which(FALLBACK_CXX)
    first_path = shutil.which(first)
    if fallback is None or (first_path and os.path.realpath(first_path) == os.path.realpath(fallback)):
        return [first]
    return [first, FALLBACK_CXX]


def _compiler_failure(exc: BaseException) -> Optional[BaseException]:
    """The C++ compiler's own failure (missing, or rejecting the generated code) inside exc, which
    Inductor may wrap (InductorError), or None when the failure is not the compiler's."""
    from torch._inductor import exc as inductor_exc

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (inductor_exc.InvalidCxxCompiler, inductor_exc.CppCompileError)):
            return exc
        exc = getattr(exc, "inner_exception", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def ensure_loaded(path: Path, export: Callable[[], object], device: torch.device, report: AotReport):
    """The package at path, made first where the cache has none (_build_checked); the time each
    step took goes into report."""
    if not path.exists():
        _build_checked(path, export, device, report)
    mark = time.perf_counter()
    runner = _load_package(path, device)
    report.load_s += time.perf_counter() - mark
    report.loaded.append(path.stem)
    return runner


def _build_checked(path: Path, export: Callable[[], object], device: torch.device, report: AotReport) -> None:
    """export(), then AOTInductor into path, then a load of the package in a child process before
    this one trusts it. A package that kills its loader (a signal, or no answer) is deleted and the
    compiler that built it recorded beside it (`*.pt2.broken`), as is a compiler that is missing or
    rejects the generated code; the next candidate (CXX's compiler first, then the system g++) then
    builds it. A compiler on record is not asked again: a later start goes straight to the one that
    works or, all on record, raises BrokenPackage at once (the caller falls back to torch.compile).
    A compiler not on record (CXX changed) gets a try; one refused for another package in this
    process does not (_REFUSED_IN_THIS_PROCESS), and is recorded for this package too."""
    from torch._inductor import config as inductor_config

    verdict_path = _verdict_path(path)
    broken = _read_verdicts(verdict_path)
    candidates = _compiler_candidates()
    exported = None
    for cxx in candidates:
        if cxx in broken:
            continue
        if cxx in _REFUSED_IN_THIS_PROCESS:
            broken[cxx] = _REFUSED_IN_THIS_PROCESS[cxx]
            _write_verdicts(verdict_path, broken)
            continue
        mark = time.perf_counter()
        if exported is None:
            exported = export()
        refused, stderr_tail = None, ""  # why this compiler's package is not used
        try:
            with inductor_config.patch({"cpp.cxx": (None, cxx)}):
                _compile_package(exported, path)
        except Exception as exc:
            failure = _compiler_failure(exc)
            if failure is None:
                raise  # not the compiler's doing: another would fail the same way
            refused = f"{failure.__class__.__name__}: {str(failure).strip()[:200]}"
        else:
            check = load_in_child(path, str(device))
            if check["crashed"]:
                refused, stderr_tail = why_failed(check), check.get("stderr_tail", "")
            elif not check["ok"]:  # an exception, not a crash: the load in this process raises it too
                log.warning(
                    "the child's load of a new package failed",
                    extra={"event": "aot_check_failed", "package": path.name, "why": why_failed(check)},
                )
        report.compile_s += time.perf_counter() - mark  # (the check's few seconds count as compiling)
        if refused is None:
            if cxx != candidates[0]:
                log.warning(
                    "package built by another C++ compiler",
                    extra={
                        "event": "aot_compiler_fallback",
                        "package": path.name,
                        "compiler": cxx,
                        "refused": sorted(broken),
                    },
                )
            report.compiled.append(path.stem)
            return
        broken[cxx] = refused
        _REFUSED_IN_THIS_PROCESS[cxx] = f"{refused} (building {path.name})"
        log.error(
            "a C++ compiler's package crashed its loader or was not built; not used",
            extra={
                "event": "aot_package_broken",
                "package": path.name,
                "compiler": cxx,
                "why": refused,
                "stderr_tail": stderr_tail[-1500:],
            },
        )
        path.unlink(missing_ok=True)
        _write_verdicts(verdict_path, broken)
    reasons = "; ".join(f"{cxx}: {why}" for cxx, why in sorted(broken.items()))
    raise BrokenPackage(
        f"no C++ compiler made a {path.name} that loads ({reasons}); set CXX to a working one, "
        f"or remove {verdict_path} to try again"
    )


def device_index(device: torch.device) -> int:
    if device.type != "cuda":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()
