"""A LoRA under torch.compile (compile_backend = "jit") on the CPU's Inductor: merged in place, it
is in the compiled picture (as eager has it), and switching LoRAs compiles nothing — dynamo guards
on the weights' identity and shape, not their values, so one set of graphs serves every LoRA.
(The AOT packages: tests/app/test_aot.py.)"""

import numpy as np
import pytest
import torch
import torch._dynamo.config
import torch.fx.experimental._config

from tests.engine_helpers import block_graphs, image, make_engine, psnr
from tests.lora_files import make_lora


@pytest.mark.slow  # torch.compile builds: tens of seconds
def test_switching_loras_under_torch_compile_compiles_nothing(tmp_path):
    make_lora(tmp_path / "loras", "ink", seed=1, magnitude=0.2)
    make_lora(tmp_path / "loras", "film", seed=2, targets=["w1", "w2", "w3"], magnitude=0.2)
    common = dict(compile_cache_dir=tmp_path / "cache", lora_dir=tmp_path / "loras")
    eager = make_engine(tmp_path / "eager", compile="off", **common)
    compiled = make_engine(  # (compiling in requests: a LoRA that broke a guard would show as a compile)
        tmp_path / "jit",
        compile="on",
        compile_backend="jit",
        compile_in_requests=True,
        ready_timeout=900,
        **common,
    )
    try:
        assert compiled.loaded.compile_backend == "jit"
        graphs = block_graphs()
        plain = image(compiled, "a lighthouse")[0]
        for loras in ((("ink", 1.0),), (("film", 0.8), ("ink", -0.5)), ()):
            got = image(compiled, "a lighthouse", loras=loras)[0]
            assert psnr(got, image(eager, "a lighthouse", loras=loras)[0]) > 40, loras
            assert (psnr(got, plain) < 30) == bool(loras), loras
        assert np.array_equal(image(compiled, "a lighthouse")[0], plain)
        assert compiled.compiles_after_warmup == 0 and block_graphs() == graphs
    finally:
        eager.stop()
        compiled.stop()
        torch.compiler.set_stance("default")
        torch.fx.experimental._config.backed_size_oblivious = False
        torch.fx.experimental._config.use_duck_shape = True
        torch._dynamo.config.specialize_float = False
