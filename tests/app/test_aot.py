"""The AOT path (compile_backend = "aot", app/runtime/aot/) on the CPU: the same torch.export and
AOTInductor packaging the GPU runs, through the engine as it serves. Checked: the same pictures as
eager for every kind of request (one image, a 2-image request, a merged batch whose prompts differ
in length, other sizes); nothing compiles at the warm-up or in requests; a second start only loads
the packages; and the guards around them (a crashed load, a failed export) fall back to
torch.compile instead of failing the start. Packaging on 2 CPU cores takes ~2 min, done once."""

import threading

import numpy as np
import pytest
import torch

from app.runtime import aot
from app.runtime.aot import export, store, verify
from tests.engine_helpers import LONG, image, make_engine, params, psnr
from tests.lora_files import make_lora

# Packaging takes ~2 min on an idle 2-core machine; with the other test worker and more load
# beside it (a busy CI host) it took over 300 s, the suite's default timeout.
BUILD_TIMEOUT = pytest.mark.timeout(1200)
BUILD_READY_S = 900


def merged(engine, prompts, seed=3):
    """Two requests of one shape queued together: the engine merges them (max_batch=2)."""
    jobs = [
        engine.submit(params(prompt=p, width=128, height=128, num_inference_steps=2, seed=seed + i))
        for i, p in enumerate(prompts)
    ]
    return [np.asarray(j.future.result(600).images[0]).astype(float) for j in jobs]


def packaged_calls(engine):
    transformer = engine.loaded.pipe.transformer
    blocks = sum(b.forward.packaged_calls for b in aot.blocks_of(transformer))
    return blocks, engine.loaded.pipe.vae.decoder.forward.packaged_calls


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("aot-cache")


@pytest.fixture(autouse=True)
def new_process(monkeypatch):
    """Each test starts as a new process would: no compiler refused yet."""
    monkeypatch.setattr(store, "_REFUSED_IN_THIS_PROCESS", {})


def test_rotate_real_is_the_complex_rope():
    x = torch.randn(2, 7, 3, 16)
    freqs = torch.polar(torch.ones(2, 7, 8), torch.randn(2, 7, 8))
    reference = torch.view_as_real(
        torch.view_as_complex(x.reshape(2, 7, 3, 8, 2)) * freqs.unsqueeze(2)
    ).flatten(3)
    torch.testing.assert_close(
        export.rotate_real(x, torch.view_as_real(freqs)), reference, rtol=1e-6, atol=1e-6
    )


@pytest.mark.slow  # AOTInductor/torch.compile builds: tens of seconds
@BUILD_TIMEOUT
def test_packages_serve_every_request_kind_and_nothing_compiles(tmp_path, cache):
    common = dict(compile_cache_dir=cache, max_batch=2, queue_size=8)
    eager = make_engine(tmp_path / "eager", compile="off", **common)
    packaged = make_engine(
        tmp_path / "aot", compile="on", compile_backend="aot", ready_timeout=BUILD_READY_S, **common
    )
    try:
        loaded = packaged.loaded
        assert loaded.compile_backend == "aot", loaded.notes
        assert loaded.phases["aot_compile_s"] > 0  # made in this start: the cache was empty
        names = sorted(p.name for p in (cache / "aot").glob("*/*.pt2"))
        assert names == [
            "decoder-1x16x16x16.pt2",
            "mod-mask.pt2",
            "mod-nomask.pt2",
            "plain-mask.pt2",
            "plain-nomask.pt2",
        ], names
        assert packaged.warmup.compile["compiles"] == 0  # no dynamo: nothing traced at the warm-up
        # the warm-up went through the packages: every block, and the decoder at its size for its
        # one image and the merged batch's two (a batch is decoded one image at a time)
        blocks, decodes = packaged_calls(packaged)
        assert blocks >= len(aot.blocks_of(loaded.pipe.transformer)) and decodes == 1 + 2

        for prompt, width, height, n in (
            ("a fox", 128, 128, 1),
            (LONG, 192, 128, 1),
            ("a fox", 128, 128, 2),
            (LONG, 128, 256, 1),
        ):
            for a, b in zip(
                image(eager, prompt, width, height, n), image(packaged, prompt, width, height, n)
            ):
                assert psnr(a, b) > 45, (prompt[:10], width, height, n)  # same picture, up to kernel rounding
        # a merged batch of prompts of different lengths (the masked kinds)
        for a, b in zip(merged(eager, ["a fox", LONG]), merged(packaged, ["a fox", LONG])):
            assert psnr(a, b) > 45
        assert packaged.compiles_after_warmup == 0
        blocks_after, decodes_after = packaged_calls(packaged)
        assert blocks_after > blocks and decodes_after > decodes  # (192x128 and 128x256 decode eagerly)
    finally:
        eager.stop()
        packaged.stop()
        torch.compiler.set_stance("default")  # (process-wide, set after a compiled warm-up)


@BUILD_TIMEOUT
def test_next_start_loads_the_packages_without_compiling(tmp_path, cache):
    if not any((cache / "aot").glob("*/*.pt2")):
        pytest.skip("needs the packages of the test above")
    engine = make_engine(
        tmp_path,
        compile="on",
        compile_backend="aot",
        max_batch=2,
        compile_cache_dir=cache,
        ready_timeout=BUILD_READY_S,
    )
    try:
        assert engine.loaded.compile_backend == "aot"
        assert "aot_compile_s" not in engine.loaded.phases and engine.loaded.phases["aot_load_s"] < 10
        first = image(engine, "a lighthouse")[0]
        assert np.array_equal(first, image(engine, "a lighthouse")[0])  # deterministic on the packages
        # The packages run without AOTInductor's thread-safety protocol: only the engine's thread
        # may call them; a call from any other thread runs the eager forward.
        before = packaged_calls(engine)

        def from_another_thread():
            with torch.inference_mode():
                engine.loaded.pipe(
                    prompt="a lighthouse", height=128, width=128, num_inference_steps=2, output_type="latent"
                )

        other = threading.Thread(target=from_another_thread)
        other.start()
        other.join(300)
        assert not other.is_alive() and packaged_calls(engine) == before
        image(engine, "a lighthouse")
        assert packaged_calls(engine)[0] > before[0]  # (the engine's own calls still go through them)
    finally:
        engine.stop()
        torch.compiler.set_stance("default")


@BUILD_TIMEOUT
def test_a_merged_lora_runs_in_the_packages(tmp_path, cache):
    """The packages take each block's weight tensors as inputs: a LoRA merged into them in place is
    in the picture (the same as eager with the same LoRA), and its request still runs the packages."""
    if not any((cache / "aot").glob("*/*.pt2")):
        pytest.skip("needs the packages of the test above")
    make_lora(tmp_path / "loras", "ink", seed=1, magnitude=0.2)
    common = dict(max_batch=2, compile_cache_dir=cache, lora_dir=tmp_path / "loras")
    packaged = make_engine(
        tmp_path / "aot", compile="on", compile_backend="aot", ready_timeout=BUILD_READY_S, **common
    )
    eager = make_engine(tmp_path / "eager", compile="off", **common)
    try:
        assert packaged.loaded.compile_backend == "aot"
        plain = image(packaged, "a lighthouse")[0]
        before = packaged_calls(packaged)[0]
        styled = image(packaged, "a lighthouse", loras=(("ink", 1.0),))[0]
        assert packaged_calls(packaged)[0] > before  # through the packages, not the eager fallback
        assert psnr(plain, styled) < 30  # the LoRA is in the picture ...
        assert (
            psnr(styled, image(eager, "a lighthouse", loras=(("ink", 1.0),))[0]) > 45
        )  # ... as eager has it
        assert np.array_equal(image(packaged, "a lighthouse")[0], plain)  # and leaves no trace
    finally:
        packaged.stop()
        eager.stop()
        torch.compiler.set_stance("default")


@pytest.mark.slow  # AOTInductor/torch.compile builds: tens of seconds
@BUILD_TIMEOUT
def test_load_check_loads_each_package_in_a_child_and_reports_a_crash(tmp_path, cache, monkeypatch):
    """ops/lab/aot_load_check: every package of a cache loads in a fresh process; a load that kills its
    process is reported with the signal and faulthandler's stack, and fails the check."""
    from ops.lab import aot_load_check

    if not aot_load_check.packages(cache):
        pytest.skip("needs the packages of the first test")
    assert aot_load_check.main(["--compile-cache", str(cache)]) == 0
    monkeypatch.setattr(
        verify, "_CHILD_LOAD", "import os, signal\n{imports}\nos.kill(os.getpid(), signal.SIGSEGV)"
    )
    row = verify.load_in_child(aot_load_check.packages(cache)[0], "cpu")
    assert (
        not row["ok"]
        and row["crashed"]
        and row["returncode"] == -11
        and "Segmentation fault" in row["stderr_tail"]
    )
    assert aot_load_check.main(["--compile-cache", str(cache)]) == 1
    assert (
        aot_load_check.main(["--compile-cache", str(tmp_path / "empty")]) == 1
    )  # nothing to check is no pass


@pytest.mark.slow  # AOTInductor/torch.compile builds: tens of seconds
@BUILD_TIMEOUT
def test_a_package_that_crashes_its_loader_is_rebuilt_by_another_compiler_or_refused(tmp_path, monkeypatch):
    """A package just compiled is loaded in a child first (on the H100, packages built through the
    machine's CXX wrapper all died with SIGSEGV at load): one that kills the child is deleted, its
    compiler recorded, and the next candidate compiler builds it; with every candidate on record the
    start gets BrokenPackage at once (and falls back to torch.compile), without compiling again."""
    import json

    linear = torch.nn.Linear(4, 3)
    exports, compilers, checks = [], [], []

    def export():
        exports.append(1)
        return torch.export.export(linear, (torch.randn(2, 4),))

    real_compile, real_check = store._compile_package, store.load_in_child

    def compile_package(exported, path):  # which compiler Inductor was given for this build
        from torch._inductor import config

        compilers.append(config.cpp.cxx[-1])
        real_compile(exported, path)

    def check_crashing_first(path, device):  # the first build "segfaults" its loader
        checks.append(path.name)
        if len(checks) == 1:
            return {
                "package": str(path),
                "ok": False,
                "crashed": True,
                "returncode": -11,
                "stderr_tail": "Fatal Python error: Segmentation fault",
            }
        return real_check(path, device)

    monkeypatch.setattr(store, "_compile_package", compile_package)
    monkeypatch.setattr(store, "load_in_child", check_crashing_first)
    monkeypatch.setattr(
        store, "_compiler_candidates", lambda: ["c++", "g++"]
    )  # ("c++": the CXX of this test)
    package, verdict = tmp_path / "mod-nomask.pt2", tmp_path / "mod-nomask.pt2.broken"
    report = aot.AotReport()
    runner = store.ensure_loaded(package, export, torch.device("cpu"), report)
    assert compilers == ["c++", "g++"] and exports == [1] and len(checks) == 2  # (exported once)
    assert json.loads(verdict.read_text()) == {"broken": {"c++": "killed by SIGSEGV"}}
    assert report.compiled == report.loaded == ["mod-nomask"]
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), linear(x))
    # the next package of the same start does not ask the refused compiler again (on the H100 that
    # was a wasted build and check per package), and records why beside itself
    other = tmp_path / "other" / "decoder.pt2"
    other.parent.mkdir()
    store.ensure_loaded(other, export, torch.device("cpu"), aot.AotReport())
    assert compilers[-1] == "g++" and len(compilers) == 3 and len(checks) == 3
    assert json.loads((tmp_path / "other" / "decoder.pt2.broken").read_text()) == {
        "broken": {"c++": "killed by SIGSEGV (building mod-nomask.pt2)"}
    }
    store._REFUSED_IN_THIS_PROCESS.clear()  # from here on, each build is the first of a new start
    # a compiler that is not there (and so cannot build: Inductor really is given the candidate)
    package.unlink()
    verdict.unlink()
    monkeypatch.setattr(store, "_compiler_candidates", lambda: ["/nonexistent/c++", "c++"])
    store.ensure_loaded(package, export, torch.device("cpu"), aot.AotReport())
    assert compilers[-2:] == ["/nonexistent/c++", "c++"]
    assert "InvalidCxxCompiler" in json.loads(verdict.read_text())["broken"]["/nonexistent/c++"]
    store._REFUSED_IN_THIS_PROCESS.clear()
    monkeypatch.setattr(store, "_compiler_candidates", lambda: ["c++", "g++"])
    verdict.write_text(json.dumps({"broken": {"c++": "killed by SIGSEGV"}}))
    # the cache cleared but the record kept: the next build goes straight to the compiler that works
    package.unlink()
    store.ensure_loaded(package, export, torch.device("cpu"), aot.AotReport())
    assert compilers[-1] == "g++" and len(compilers) == 6
    # every candidate on record: refused at once, nothing exported or compiled
    package.unlink()
    verdict.write_text(json.dumps({"broken": {"c++": "killed by SIGSEGV", "g++": "killed by SIGSEGV"}}))
    with pytest.raises(aot.BrokenPackage, match="set CXX .* remove .*broken"):
        store.ensure_loaded(package, export, torch.device("cpu"), aot.AotReport())
    assert len(exports) == 4 and len(compilers) == 6
    # a child whose load raises is no crash: the package is kept and the load here decides
    verdict.unlink()
    monkeypatch.setattr(store, "load_in_child", real_check)
    monkeypatch.setattr(verify, "_CHILD_LOAD", "{imports}\nraise RuntimeError('no GPU left')")
    store.ensure_loaded(package, export, torch.device("cpu"), aot.AotReport())
    assert package.exists() and not verdict.exists() and compilers[-1] == "c++"


def test_a_failure_that_is_not_the_compilers_is_not_retried_nor_recorded(tmp_path, monkeypatch):
    def failing_compile(exported, path):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(store, "_compile_package", failing_compile)
    monkeypatch.setattr(store, "_compiler_candidates", lambda: ["c++", "g++"])
    with pytest.raises(RuntimeError, match="lowering failed") as raised:
        store.ensure_loaded(
            tmp_path / "mod-nomask.pt2", lambda: object(), torch.device("cpu"), aot.AotReport()
        )
    assert (
        not isinstance(raised.value, aot.BrokenPackage) and not (tmp_path / "mod-nomask.pt2.broken").exists()
    )


def test_the_child_check_reports_a_real_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(
        verify, "_CHILD_LOAD", "import os, signal\n{imports}\nos.kill(os.getpid(), signal.SIGSEGV)"
    )
    row = verify.load_in_child(tmp_path / "any.pt2", "cpu")
    assert not row["ok"] and row["crashed"] and verify.why_failed(row) == "killed by SIGSEGV"
    assert "Segmentation fault" in row["stderr_tail"]
    monkeypatch.setattr(verify, "_CHILD_LOAD", "{imports}\nraise RuntimeError('no GPU left')")
    row = verify.load_in_child(tmp_path / "any.pt2", "cpu")
    assert not row["ok"] and not row["crashed"] and "no GPU left" in verify.why_failed(row)


def test_compiler_candidates_are_cxx_then_the_system_gxx(monkeypatch):
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("no g++ here")
    monkeypatch.setattr(store, "cpp_compiler", lambda: "g++")
    assert store._compiler_candidates() == ["g++"]
    monkeypatch.setattr(store, "cpp_compiler", lambda: "/opt/gcc/bin/g++")  # (the lent machine's CXX)
    assert store._compiler_candidates() == ["/opt/gcc/bin/g++", "g++"]


def dead_pid():
    """A pid no process has: a child that has exited and been reaped."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_loads_that_kept_dying_make_the_next_start_refuse_the_package(tmp_path):
    package = tmp_path / "mod-nomask.pt2"
    package.write_bytes(b"not a package")
    marker = tmp_path / "mod-nomask.pt2.loading"
    # one start that died mid-load (killed during start-up, say) is forgiven: the load is retried,
    # and finishing (here: failing with an exception) clears the marker
    marker.write_text(str(dead_pid()))
    with pytest.raises(Exception) as raised:
        store._load_package(package, torch.device("cpu"))
    assert not isinstance(raised.value, store.PreviousLoadCrashed) and not marker.exists()
    # as many as the limit, all gone: a crash that repeats, so the package is refused
    marker.write_text(" ".join(str(dead_pid()) for _ in range(store.CRASHED_LOADS_LIMIT)))
    with pytest.raises(store.PreviousLoadCrashed):
        store._load_package(package, torch.device("cpu"))
    # a load still running in another process (this one's parent, alive) is not a crash
    import os

    marker.write_text(" ".join([str(os.getppid())] * store.CRASHED_LOADS_LIMIT))
    with pytest.raises(Exception) as raised:
        store._load_package(package, torch.device("cpu"))
    assert not isinstance(raised.value, store.PreviousLoadCrashed)


def test_a_process_that_exits_normally_mid_load_leaves_no_crash_evidence(tmp_path):
    """SIGTERM during start-up: the main thread exits while the engine thread is still loading."""
    import subprocess
    import sys

    script = f"""
import threading, time, torch, pathlib
from app.runtime import aot
from app.runtime.aot import export, store, verify
loading = threading.Event()
def load(*args, **kwargs):  # a load that is still running when the process exits
    loading.set()
    time.sleep(30)
torch._inductor.aoti_load_package = load
package = pathlib.Path({str(tmp_path / "mod-nomask.pt2")!r})
threading.Thread(target=store._load_package, args=(package, torch.device("cpu")), daemon=True).start()
assert loading.wait(60)
print("loading", package.with_name(package.name + ".loading").exists(), flush=True)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "loading True" in done.stdout, done.stderr[
        -2000:
    ]  # (marked while loading)
    assert not (tmp_path / "mod-nomask.pt2.loading").exists()


def test_a_failed_export_falls_back_to_torch_compile(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("export failed for this model")

    monkeypatch.setattr(aot, "install", broken)
    # no warm-up: torch.compile compiles at the first call, and this test is about the start
    engine = make_engine(
        tmp_path, compile="on", compile_backend="aot", warmup=False, compile_cache_dir=tmp_path / "cache"
    )
    try:
        assert engine.loaded.compile_backend == "jit"
        assert any("AOT unavailable: RuntimeError: export failed" in note for note in engine.loaded.notes)
        assert not any("forward" in vars(b) for b in aot.blocks_of(engine.loaded.pipe.transformer))
    finally:
        engine.stop()
