"""The GPU memory torch holds: read it, and hand unused cache back to the driver."""

from __future__ import annotations

import gc
import logging

import torch

log = logging.getLogger(__name__)


def free_cache(device) -> dict:
    """Return unused cached GPU memory to the driver (safe while a generation runs)."""
    gc.collect()
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return {"device": "cpu", "freed_bytes": 0}
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    after = torch.cuda.memory_reserved(device)
    log.info("freed GPU cache", extra={"event": "free_cache", "freed_bytes": before - after})
    return {
        "device": str(device),
        "reserved_before": before,
        "reserved_after": after,
        "freed_bytes": before - after,
    }


def memory(device) -> dict:
    if device is None or device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "allocated_bytes": torch.cuda.memory_allocated(device),
        "reserved_bytes": torch.cuda.memory_reserved(device),
        "device_free_bytes": free,
        "device_total_bytes": total,
    }
