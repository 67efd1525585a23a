"""Ahead-of-time compiled transformer blocks and VAE decoder (`compile_backend = "aot"`): start-up speed.

torch.compile (the "jit" backend) keeps its kernels in an on-disk cache, but every start still
re-traces the Python of the blocks with dynamo and loads the cached graphs one by one (most of a
warm start's compile time, docs/PERFORMANCE.md). Here each kind of block is exported once with
torch.export (dynamic batch and sequence length) and compiled by AOTInductor into a .pt2 package
under compile_cache_dir; a later start only loads the packages (a shared library each) and no
dynamo runs at all, at start or in a request.

The VAE decoder gets one static package for the warm-up's size (the default 1024²), like the
torch.compile path it replaces; other sizes run eagerly.

export.py makes the programs, store.py builds, checks and loads packages, verify.py is the child
check, install.py puts them in place. This module is the surface the rest of the runtime uses.
"""

from app.runtime.aot.install import blocks_of, install, install_decoder, supported, uninstall
from app.runtime.aot.store import AotReport, BrokenPackage, PreviousLoadCrashed

__all__ = [
    "AotReport",
    "BrokenPackage",
    "PreviousLoadCrashed",
    "blocks_of",
    "install",
    "install_decoder",
    "supported",
    "uninstall",
]
