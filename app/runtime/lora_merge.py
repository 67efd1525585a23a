"""LoRAs put into the transformer's own weights for the request that names them, hot: no restart,
no reload of the model.

Why merged, and not peft's adapter layers (what diffusers' load_lora_weights injects): the fast
paths read the block weights themselves. An AOT package gets each block's weight tensors as inputs
(app/runtime/aot/install.py) and a jit graph was traced without adapter layers: an adapter layer
would be skipped by the packages (the image silently without its LoRA) or send every block back to
eager, about 1.5× slower. Merged, W = W₀ + Σ scale·scaling·B@A is written in place into the same
tensors, so every path (eager, jit, AOT, step cache) runs a LoRA request as fast as any other.

Exact, however often LoRAs change: the untouched W₀ of every layer a loaded LoRA touches is kept
(same device, same dtype) and each merge starts from it, in fp32, rounded once. Subtracting a LoRA
back out (peft's unmerge) would leave bf16 rounding in the weights at every switch.

Memory: the kept originals (the touched layers' weights, once) and the factors of the cached files.
Evicting a file (cache full) frees its factors and the originals no other cached file needs."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from app.runtime import lora
from app.runtime.lora import LoraLibrary, LoraWeights

log = logging.getLogger(__name__)

Wanted = tuple[tuple[str, float], ...]  # (name, scale) per LoRA, in the request's order


class LoraSet:
    """The transformer's LoRA state: which files are cached (LRU, `capacity`), which are merged now,
    and the originals of the layers they touch. Used by one thread (the engine's, or a follower
    rank's), between pipeline calls."""

    def __init__(self, transformer: nn.Module, root: Path, capacity: int):
        self.transformer = transformer
        self.library = LoraLibrary(root)
        self.capacity = capacity
        self.cached: OrderedDict[str, LoraWeights] = OrderedDict()
        self.originals: dict[str, torch.Tensor] = {}
        self.merged: tuple = ()  # ((name, version, scale), …) now in the weights
        self.loads = self.merges = 0
        self.last_merge_s = 0.0
        # What other threads may read (GET /api/loras, /api/info), replaced whole by the engine's
        # thread after each change: never the cache itself, which it mutates.
        self._status: dict = {"loaded": [], "merged": [], "bytes": 0, "merges": 0, "last_merge_s": None}

    # ---- what the engine calls ------------------------------------------------------------
    def apply(self, wanted: Wanted) -> None:
        """Make the weights hold exactly `wanted` (nothing: the model's own). Raises UnknownLora or
        InvalidLora before touching any weight."""
        weights = [self._get(name) for name, _ in wanted]
        target = tuple((w.file.name, w.file.version, scale) for w, (_, scale) in zip(weights, wanted))
        if target == self.merged:
            return
        started = time.perf_counter()
        # Every layer with a kept original is rewritten (restored or merged): that also undoes a
        # merged file that was replaced on disk since (its old factors are no longer cached).
        touched = set(self.originals) | {m for w in weights for m in w.modules}
        try:
            with torch.no_grad():
                for module in sorted(touched):
                    parts = [
                        (w.modules[module], s) for w, (_, s) in zip(weights, wanted) if module in w.modules
                    ]
                    self._write(module, parts)
        except BaseException:
            self._restore_all()  # (out of memory halfway: the model's own weights, not a mix)
            self._publish()
            raise
        self.merged = target
        self.merges += 1
        self.last_merge_s = time.perf_counter() - started
        self._evict()
        log.info(
            "lora merged",
            extra={
                "event": "lora_merged",
                "loras": [f"{n}:{s:g}" for n, _, s in target],
                "layers": len(touched),
                "seconds": round(self.last_merge_s, 4),
            },
        )

    def status(self) -> dict:
        """Loaded files, what is merged now (name, scale), their memory beside the model (factors
        and kept originals); safe from any thread."""
        return self._status

    def _publish(self) -> None:
        self._status = {
            "loaded": list(self.cached),
            "merged": [[name, scale] for name, _, scale in self.merged],
            "bytes": self.memory_bytes(),
            "merges": self.merges,
            "last_merge_s": round(self.last_merge_s, 4) if self.merges else None,
        }

    def memory_bytes(self) -> int:
        """What LoRAs cost beside the model: cached factors and kept originals."""
        return sum(w.nbytes for w in self.cached.values()) + sum(t.nbytes for t in self.originals.values())

    # ---- inside ------------------------------------------------------------------------------
    def _get(self, name: str) -> LoraWeights:
        file = self.library.find(name)
        cached = self.cached.get(name)
        if cached is not None and cached.file.version == file.version:
            self.cached.move_to_end(name)
            return cached
        weight = self._any_weight()
        loaded = lora.load(file, self.transformer, weight.device, weight.dtype)
        self.loads += 1
        # (a replaced file: the new version; the merged old one is told apart by its version)
        self.cached[name] = loaded
        self.cached.move_to_end(name)
        self._publish()
        log.info(
            "lora loaded",
            extra={
                "event": "lora_loaded",
                "lora": name,
                "layers": len(loaded.modules),
                "bytes": loaded.nbytes,
            },
        )
        return loaded

    def _restore_all(self) -> None:
        with torch.no_grad():
            for module, original in self.originals.items():
                self.transformer.get_submodule(module).weight.copy_(original)
        self.merged = ()

    def _write(self, module: str, parts: list[tuple[lora.ModuleFactors, float]]) -> None:
        weight = self.transformer.get_submodule(module).weight
        original = self.originals.get(module)
        if original is None:
            if not parts:
                return
            original = self.originals[module] = weight.detach().clone()
        if not parts:
            weight.copy_(original)
            return
        total = original.to(torch.float32, copy=True)  # (.float() of an fp32 tensor is that tensor)
        for factors, scale in parts:  # (.to: with offload = "model" the layer may have moved since)
            up, down = (f.to(total.device, torch.float32) for f in (factors.up, factors.down))
            total.addmm_(up, down, alpha=scale * factors.scaling)
        weight.copy_(total.to(weight.dtype))

    def _evict(self) -> None:
        """Drop the least recently used files beyond capacity (never one merged now), then the
        originals of layers no cached file touches (those layers hold their originals again)."""
        merged_names = {name for name, _, _ in self.merged}
        for name in list(self.cached):
            if len(self.cached) <= self.capacity:
                break
            if name not in merged_names:
                del self.cached[name]
        needed = {m for w in self.cached.values() for m in w.modules}
        for module in [m for m in self.originals if m not in needed]:
            del self.originals[module]
        self._publish()

    def _any_weight(self) -> torch.Tensor:
        return next(p for p in self.transformer.parameters() if p.dtype.is_floating_point)


def lora_set_for(pipe, settings) -> Optional[LoraSet]:
    """The pipeline's LoraSet when LoRAs are served (app.lora_dir), else None."""
    if settings.lora_dir is None:
        return None
    return LoraSet(pipe.transformer, settings.lora_dir, settings.lora_cache_size)
