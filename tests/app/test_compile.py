"""The torch.compile path (compile_backend = "jit": transformer blocks + VAE decoder, FP8 layers
inside) on the CPU's Inductor,
through the engine as it serves: the same code the GPU runs. Checked: the same picture as eager;
the warm-up compiles everything a request can bring (other sizes, longer prompts, several images)
so no request compiles a transformer block; the compile shows up in the warm-up's report, not in
the step times the monitor's stall bound is made from. Slow on 2 cores (~2-3 min), so one test
does it all. The compiled engine compiles in requests (compile_in_requests): by default a block a
request's shapes fall outside of runs eagerly, which the same picture and a zero compile count
would not reveal (the demo model's caption refiner did, for every prompt length but the warm-up's:
app/runtime/compile.py has why)."""

import pytest
import torch
import torch._dynamo.config
import torch.fx.experimental._config

from tests.engine_helpers import LONG, block_graphs, image, make_engine, psnr


@pytest.mark.slow  # AOTInductor/torch.compile builds: tens of seconds
@pytest.mark.timeout(900)  # ~2 min here; over 300 s on a CI machine 2.5x slower (a hang still ends)
def test_warm_up_compiles_what_requests_bring_and_requests_compile_nothing(tmp_path):
    common = dict(quantize="fp8", compile_cache_dir=tmp_path / "cache", max_batch=2)
    eager = make_engine(tmp_path / "eager", compile="off", **common)
    compiled = make_engine(
        tmp_path / "compiled",
        compile="on",
        compile_backend="jit",
        compile_in_requests=True,
        ready_timeout=900,
        **common,
    )
    try:
        assert compiled.loaded.compiled and not eager.loaded.compiled
        assert compiled.loaded.compile_backend == "jit"
        # the warm-up compiled (single image, a 2-image request, a merged batch with a mask) ...
        assert compiled.warmup.compile["compiles"] >= 3 and compiled.warmup.compile["compile_s"] > 0
        # ... and its compiled first step is not in the step figures: steps of the tiny model on a CPU
        # take well under a second, a compile takes tens of seconds.
        assert compiled.heartbeat.step_seconds_max < 5, compiled.heartbeat.step_seconds_max
        assert compiled.heartbeat.snapshot()["compiling_since"] is None

        graphs = block_graphs()
        # Requests the warm-up did not make: another size, a longer prompt, several images, a size
        # the VAE decoder has no graph for (its graphs are static: it compiles one here, where a
        # deployment, compiling nothing in requests, decodes that size eagerly).
        for prompt, width, height, n in (
            ("a fox", 128, 128, 1),
            (LONG, 192, 128, 1),
            ("a fox", 128, 128, 2),
            (LONG, 128, 256, 1),
        ):
            for a, b in zip(
                image(eager, prompt, width, height, n), image(compiled, prompt, width, height, n)
            ):
                assert psnr(a, b) > 40, (
                    prompt[:10],
                    width,
                    height,
                    n,
                )  # same picture, up to fused-kernel rounding
        assert block_graphs() == graphs  # no block met a shape the warm-up had not compiled for
        assert any((tmp_path / "cache" / "inductor").iterdir())  # kernels went to the persistent cache
    finally:
        eager.stop()
        compiled.stop()
        # process-wide settings the compiled engine made: later tests compile as usual
        torch.compiler.set_stance("default")
        torch.fx.experimental._config.backed_size_oblivious = False
        torch.fx.experimental._config.use_duck_shape = True
        torch._dynamo.config.specialize_float = False
