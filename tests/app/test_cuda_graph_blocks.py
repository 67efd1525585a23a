"""compile_mode = "reduce-overhead": the blocks' outputs are copied out of their CUDA graphs' memory
(app/runtime/compile.py has why). The graphs themselves need a GPU (docs/PERFORMANCE.md has the H200
run); here the copying is checked on the demo model's transformer: the same output, blocks still
found by their class name, the caller given a copy of what the block computed, applied once."""

import torch

from app.runtime.compile import copy_block_outputs
from app.runtime.tiny import build_tiny_pipeline


def test_blocks_hand_out_a_copy_and_the_transformer_computes_the_same():
    transformer = build_tiny_pipeline(torch.float32).transformer.eval()
    names = set(transformer._repeated_blocks)
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    generator = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 8, 8, generator=generator)]
    caption = [torch.randn(32, transformer.config.cap_feat_dim, generator=generator)]
    t = torch.tensor([0.5])
    seen = {}

    def before_block(_module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    def after_block(_module, _args, out):  # inside the module's call: what the graph would own
        seen["computed"] = out

    block = blocks[-1]
    block.register_forward_pre_hook(before_block, with_kwargs=True)
    block.register_forward_hook(after_block)
    with torch.inference_mode():
        expected = transformer(x, t, caption, return_dict=False)[0][0]
        copy_block_outputs(transformer)
        copy_block_outputs(transformer)  # applied once, not wrapped twice
        assert torch.equal(transformer(x, t, caption, return_dict=False)[0][0], expected)
        returned = block(*seen["args"], **seen["kwargs"])
    assert torch.equal(returned, seen["computed"])
    assert returned.untyped_storage().data_ptr() != seen["computed"].untyped_storage().data_ptr()
    found = [m for m in transformer.modules() if type(m).__name__ in names]
    assert found == blocks  # FP8 and the AOT install find blocks by this name
    assert all(type(m).copies_output for m in found)
    assert type(block).__mro__[1].__name__ == type(block).__name__  # one subclass deep
    assert not getattr(type(block).__mro__[1], "copies_output", False)
